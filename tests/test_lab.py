"""Tests of the experiment tooling in lab/: the mechanism figures, the comparison and budget tables, and the recipe of
the shipped base models. The figures render on the shipped base with the pixel size their layout gives and draw what
they say (the scored rows, the attention maps, the LISM decision of goal.py itself)."""
import functools
import json
import os
import random

import open_clip
import pytest
import torch
from PIL import Image

import cehn
import common
import data
import degla
import eval as ev
import goal
from lab import base_models, budget, compare, figures, forgetting


# ---------- figures ----------

@pytest.fixture(scope="module")
def base(shapes_base):
    """The shipped CLIP base as a figure column (loaded once for the file)."""
    return figures.load_figure_model("shapes", "shapes-tiny-vit", role="before", device="cpu")


def test_failure_figure(tmp_path, base):
    out = tmp_path / "failure.png"
    # the first 150 test scenes: their swap_att items are the first items of the whole suite, so the item is the same
    info = figures.failure_figure(base.model, base.tokenizer, base.transform, out, device="cpu", n_scenes=150)
    assert Image.open(out).size == (900, 300)
    assert info["neg_score"] >= info["pos_score"]   # the picture shows a real failure


def test_negatives_figure_degla_before_only(tmp_path, base):
    out = tmp_path / "negatives.png"
    info = figures.negatives_figure(base, None, out, method="degla", device="cpu")
    assert Image.open(out).size == (1250, 470)   # NEGATIVES_SIZE: no thresholds panel without a cehn log
    types = [t.strip() for t in degla.PAPER_DEFAULTS["neg_types"].split(",")]
    assert info["types"] == types
    negatives, valid = data.make_negatives([info["caption"]], types, progress=False,
                                           vocabulary=data.ShapesDataset.vocabulary)
    assert len(info["rows"]) == 1 + sum(valid[0])    # the caption and every valid negative, each with a score
    assert [r["text"] for r in info["rows"][1:]] == [n for n, ok in zip(negatives[0], valid[0]) if ok]
    assert info["rows"][0]["text"] == info["caption"]
    assert all("before" in r and "after" not in r for r in info["rows"])
    # the default rule picks a caption the base gets wrong: some negative scores at least as high as the caption
    assert max(r["before"] for r in info["rows"][1:]) >= info["rows"][0]["before"]


def test_negatives_figure_cehn_with_thresholds(tmp_path, base):
    log = tmp_path / "log.jsonl"
    thetas = [{f"theta_{t}": 0.5 * step + k for k, t in enumerate(cehn.NEG_TYPES)} for step in range(4)]
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0, **theta}) + "\n"
                           for step, theta in enumerate(thetas)))
    out = tmp_path / "negatives_cehn.png"
    info = figures.negatives_figure(base, base, out, method="cehn", log_path=log, device="cpu")
    assert Image.open(out).size == (1250, 470 + 280)   # NEGATIVES_SIZE plus the thresholds panel
    assert info["types"] == list(data.CEHN_TYPES) and info["thresholds"] == list(cehn.NEG_TYPES)
    assert len(info["rows"]) == 1 + len(info["types"]) - len(info["invalid"])
    assert info["invalid"] == ["action"]   # the shapes captions have no verb; the other three types all apply
    assert all(r["before"] == pytest.approx(r["after"]) for r in info["rows"])   # before = after = the base
    assert figures.read_thresholds(log)[1] == ("attribute", [0, 1, 2, 3], [1.0, 1.5, 2.0, 2.5])
    no_theta = tmp_path / "plain.jsonl"
    no_theta.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ev.BenchmarkDataError, match="theta"):
        figures.negatives_figure(base, None, tmp_path / "x.png", method="cehn", log_path=no_theta, device="cpu")


def test_c2lip_figure(tmp_path, base):
    out = tmp_path / "c2lip.png"
    info = figures.c2lip_figure(base, base, out, device="cpu")
    assert info["concepts"] == data.extract_concepts([info["caption"]], progress=False)[0]
    assert Image.open(out).size == (1120, 130 + 240 * len(info["concepts"]) + 100)   # C2LIP_TOP + rows + BOTTOM
    attention = torch.tensor(info["before"]["attention"])
    assert attention.shape == (len(info["concepts"]), info["grid"] ** 2) == (len(info["concepts"]), 64)
    assert torch.allclose(attention.sum(-1), torch.ones(len(info["concepts"])), atol=1e-5)
    assert info["after"]["attention"] == info["before"]["attention"]


def test_goal_figure_is_goal_lism(tmp_path, base):
    out = tmp_path / "goal.png"
    info = figures.goal_figure(base, None, out, device="cpu")
    assert Image.open(out).size == (1180, 660)   # GOAL_SIZE
    assert info["after"] is None and len(info["rows"]) == len(info["sentences"])
    # the kept pair is the one goal.run_lism keeps for this scene
    world = data.ShapesDataset("test", size=ev.SHAPES_SUITE_SCENES, seed=ev.SHAPES_SUITE_SEED,
                               transform=base.transform, long=True)
    long_tokenizer = common.tokenizer_for("shapes-tiny-vit", goal.SHAPES_GOAL_DEFAULTS["context_length"])
    matched = goal.run_lism(base.model, base.tokenizer, torch.utils.data.Subset(world, [info["index"]]),
                            long_tokenizer, "cpu")
    (entry,) = matched.values()
    crop, sentence, _ = info["before"]["kept"]
    assert entry["pairs"][0]["box"] == info["before"]["boxes"][crop]
    assert entry["pairs"][0]["sentence"] == info["sentences"][sentence]
    # the highlighted TSL cells lie inside that box (8 px patches of the 64 px image)
    x0, y0, x1, y1 = info["before"]["boxes"][crop]
    cells = [divmod(p, info["grid"]) for p, inside in enumerate(info["before"]["patch_mask"]) if inside]
    assert cells and all(x0 < (c + 1) * 8 and c * 8 < x1 and y0 < (r + 1) * 8 and r * 8 < y1 for r, c in cells)


# ---------- compare and budget ----------

def _fake_run(folder, method, seed_offset, steps_logged=(10, 20)):
    """A finished run folder as the method scripts write it (config.json, log.jsonl, results.json)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method}))
    (folder / "log.jsonl").write_text("".join(json.dumps({"step": s, "samples_per_s": 100.0 + seed_offset}) + "\n"
                                              for s in steps_logged))
    result = lambda v: {"shapes": {"metrics": {"swap_att": v}, "summary": {"SWAP": v}, "n": 10, "missing": 0}}
    (folder / "results.json").write_text(json.dumps({"before": result(50.0), "after": result(60.0 + seed_offset),
                                                     "extra": {"wall_seconds": 30.0 + seed_offset}}))


def test_compare_tabulates_finished_runs(tmp_path, capsys):
    for seed in (0, 2):
        _fake_run(tmp_path / f"degla-{seed}", "degla", seed)
    _fake_run(tmp_path / "plain-0", "plain", 0)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{compare.COMPARE_BEGIN}\nold\n{compare.COMPARE_END}\noutro\n")
    table = compare.compare_main(["--runs", str(tmp_path / "degla-0"), str(tmp_path / "degla-2"),
                     str(tmp_path / "plain-0"), "--out", str(tmp_path / "cmp"), "--readme", str(readme)])
    # mean +- sample std over the two degla seeds: 61 +- 1.4; plain a single run: 60, with no spread shown
    assert "| shapes | **SWAP** | 50.00 | 61.0 ± 1.4 | 60.0 |" in table
    assert "| run | wall time per run (s) | | 31 ± 1 | 30 |" in table
    assert "| run | training samples/s | | 101 ± 1 | 100 |" in table
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "\nold\n" not in text
    assert "| shapes | **SWAP** | 50.00 | 61.0 ± 1.4 | 60.0 |" in text   # the README keeps the summary rows,
    assert "| shapes | swap_att |" in table and "| shapes | swap_att |" not in text   # compare.md has them all
    assert (tmp_path / "cmp" / "compare.md").read_text().strip() == table.strip()


def test_compare_runs_refuses_an_unfinished_run_folder(tmp_path):
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no results.json in .*running: --runs takes finished run folders"):
        compare.compare_main(["--runs", str(tmp_path / "running"), "--out", str(tmp_path / "out")])


def test_compare_runs_are_named_by_what_their_config_says(tmp_path):
    """--runs: plain and NegCLIP are degla.py runs and plain SigLIP is a c2lip.py run; each gets its own column."""
    configs = {"plain": {"method": "degla", "baseline": "plain"}, "negclip": {"method": "degla", "baseline": "negclip"},
               "degla": {"method": "degla", "baseline": None},
               "plain-siglip": {"method": "c2lip", "model": "shapes-tiny-siglip", "w_npc": 0.0, "w_xac": 0.0},
               "c2lip": {"method": "c2lip", "model": "shapes-tiny-siglip", "w_npc": 1.0, "w_xac": 0.5},
               "c2lip-clip": {"method": "c2lip", "model": "shapes-tiny-vit", "w_npc": 1.0, "w_xac": 0.5},
               "plain-long": {"method": "goal", "local_weight": 0.0, "tsl_weight": 0.0},
               "goal": {"method": "goal", "local_weight": 1.0, "tsl_weight": 1.0}, "cehn": {"method": "cehn"},
               "cehn-itchn": {"method": "cehn", "itc_hn": 1, "w_cmr": 0.0, "w_imc": 0.0},
               "cehn-spatial": {"method": "cehn", "neg_types": "relation,attribute,object,spatial"},
               "cehn-itchn-spatial": {"method": "cehn", "itc_hn": 1, "w_cmr": 0.0, "w_imc": 0.0,
                                      "neg_types": "relation,attribute,object,spatial"}}
    for name, config in configs.items():
        assert compare.compare_name(config) == name
    for i, name in enumerate(("plain", "negclip")):
        _fake_run(tmp_path / name, name, i)
        (tmp_path / name / "config.json").write_text(json.dumps(configs[name]))
    table = compare.compare_main(["--runs", str(tmp_path / "plain"), str(tmp_path / "negclip"), "--out",
                     str(tmp_path / "cmp")])
    assert "| benchmark | metric | before | plain | negclip |" in table


def test_compare_no_train_tabulates_only_finished_runs(tmp_path, monkeypatch):
    """--no-train: requested runs without results.json are left out, and nothing is started."""
    _fake_run(tmp_path / "plain-seed0", "plain", 0)
    _fake_run(tmp_path / "plain-seed1", "plain", 2)
    _fake_run(tmp_path / "degla-seed0", "degla", 1)
    monkeypatch.setattr(compare, "_compare_run", lambda *a, **k: pytest.fail("--no-train started a run"))
    table = compare.compare_main(["--methods", "plain,degla", "--seeds", "0,1", "--out", str(tmp_path), "--no-train"])
    assert "| shapes | **SWAP** | 50.00 | 61.0 ± 1.4 | 61.0 |" in table   # plain: 2 runs; degla: its one run
    assert "runs per method: plain 2, degla 1" in table


def test_compare_clock_counts_only_time_when_a_run_was_going(tmp_path):
    """Two overlapping runs and one run an hour later: busy time 150 s + 100 s, not the 3,700 s span."""
    runs = {}
    for name, end, seconds in (("a", 1000.0, 100.0), ("b", 1050.0, 100.0), ("c", 4700.0, 100.0)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "compare_time.json").write_text(json.dumps({"wall_seconds": seconds}))
        os.utime(run_dir / "compare_time.json", (end, end))
        runs[name] = [run_dir]
    busy, total = compare._run_clock(runs)
    assert busy == pytest.approx(250.0) and total == pytest.approx(300.0)
    # committed records in a fresh clone: every file carries the checkout's mtime; the written end time counts
    for name, end in (("a", 1000.0), ("b", 1050.0), ("c", 4700.0)):
        path = tmp_path / name / "compare_time.json"
        path.write_text(json.dumps({"wall_seconds": 100.0, "ended_at": end}))
        os.utime(path, (9999.0, 9999.0))
    assert compare._run_clock(runs) == (pytest.approx(250.0), pytest.approx(300.0))


def _fake_shapes_run(folder, method, seed, model, after, before=50.0, zero_shot=90.0, **config):
    """A finished shapes run whose every suite metric is `after` (and `before`), zero-shot `zero_shot`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"method": method, "seed": seed, "model": model, **config}))
    keys = ["replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
            "aro_relation", "aro_attribute", "retrieval_i2t_r1", "retrieval_t2i_r1", "long_i2t_r1", "long_t2i_r1"]
    result = lambda v, zs: {"shapes": {"metrics": {**{k: v for k in keys}, **{k: zs for k in compare.ZEROSHOT_KEYS}},
                                       "summary": {"SWAP": v}, "n": 10, "missing": 0}}
    (folder / "results.json").write_text(json.dumps({"before": result(before, 100.0),
                                                     "after": result(after, zero_shot)}))


def test_compare_targets_pair_seeds_and_apply_the_spread_rule(tmp_path):
    """NegCLIP 60/61/62 against plain 50/52/51: paired +10, +9, +11, spreads 2 and 2 -> beats. CE-CLIP 52/50/54
    against plain: paired +2, -2, +3 -> within the spread. C2LIP runs on another base: its own table."""
    runs = {}
    for method, values, model in (("plain", (50, 52, 51), "shapes-tiny-vit"), ("negclip", (60, 61, 62), "shapes-tiny-vit"),
                                  ("cehn", (52, 50, 54), "shapes-tiny-vit"),
                                  ("plain-siglip", (55, 56, 57), "shapes-tiny-siglip"),
                                  ("c2lip", (58, 59, 61), "shapes-tiny-siglip")):
        runs[method] = []
        for seed, value in enumerate(values):
            run_dir = tmp_path / f"{method}-seed{seed}"
            _fake_shapes_run(run_dir, method, seed, model, value, before=40.0 if "siglip" in model else 50.0)
            runs[method].append(run_dir)
    targets = compare.compare_targets_table(runs)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in targets.splitlines()[2:]}
    aro = "ARO: mean of relation order and attribute binding"
    assert "| 51.0 ± 1.0 | 61.0 ± 1.0 | 10.0 ± 1.0 | yes |" in rows[("negclip", aro, "plain")]
    assert "| 52.0 ± 2.0 | 1.0 ± 2.6 | no (within spread) |" in rows[("cehn", aro, "plain")]
    assert "| 40.00 | 56.0 ± 1.0 | 59.3 ± 1.5 | 3.3 ± 0.6 | yes |" in rows[("c2lip", "mean of swap_att, replace_att, ADD",
                                                                         "plain-siglip")]
    assert ("degla", "mean of replace and swap subsets", "plain") not in rows   # no DeGLA runs: no row
    assert compare.beats({0: 60.0}, {0: 50.0}) == "1 seed"
    assert compare.beats({0: 40.0, 1: 41.0}, {0: 50.0, 1: 52.0}) == "no (worse)"
    # the verdict picture: one row per target row; green bars for "yes", red for "no (worse)" (CE-CLIP against
    # NegCLIP), grey for "within spread"
    target_rows = compare.target_rows(runs)
    verdicts = [r["verdict"] for r in target_rows]
    assert (verdicts.count("yes"), verdicts.count("no (worse)"), len(verdicts)) == (3, 2, len(rows))
    picture = Image.open(compare.verdict_figure(target_rows, tmp_path / "verdicts.png")).convert("RGB")
    colours = {colour for _, colour in picture.getcolors(maxcolors=1 << 20)}
    assert figures.GREEN in colours and figures.RED in colours and figures.GREY in colours
    table = compare.compare_table(runs)
    assert "Starting from **shapes-tiny-vit**:" in table and "Starting from **shapes-tiny-siglip**:" in table
    siglip_part = table[table.index("Starting from **shapes-tiny-siglip**:"):]
    assert "| benchmark | metric | before | plain-siglip | c2lip |" in siglip_part
    assert "| shapes | **SWAP** | 40.00 | 56.0 ± 1.0 | 59.3 ± 1.5 |" in siglip_part   # its own 'before'


def test_budget_reuses_compare_runs_and_trains_the_rest_cheapest_first(tmp_path, monkeypatch):
    """`eval.py budget`: the 1000-step runs of `compare` are reused, the missing runs are trained shortest budget
    first, and the table gives baseline / method (difference) per step count."""
    compare_dir, out = tmp_path / "compare", tmp_path / "budget"
    _fake_shapes_run(compare_dir / "plain-seed0", "degla", 0, "shapes-tiny-vit", 53.0, steps=1000)
    _fake_shapes_run(compare_dir / "negclip-seed0", "degla", 0, "shapes-tiny-vit", 61.0, steps=1000)
    _fake_shapes_run(compare_dir / "plain-seed1", "degla", 1, "shapes-tiny-vit", 50.0, steps=1000)   # other seed
    started = []

    def fake_run(method, seed, run_dir, steps, *rest):
        started.append((method, steps))
        _fake_shapes_run(run_dir, "degla", seed, "shapes-tiny-vit", {"plain": 52.0, "negclip": 54.5}[method],
                         steps=steps)

    monkeypatch.setattr(compare, "_compare_run", fake_run)
    table = budget.budget_main(["--methods", "plain,negclip", "--steps", "500,250,1000", "--out", str(out),
                     "--reuse", str(compare_dir), "--jobs", "1"])
    assert started == [("plain", 250), ("negclip", 250), ("plain", 500), ("negclip", 500)]
    aro_row = next(line for line in table.splitlines() if line.startswith("| negclip | ARO"))
    assert aro_row.endswith("| 52.0 / 54.5 (+2.5) | 52.0 / 54.5 (+2.5) | 53.0 / 61.0 (+8.0) |")
    assert (out / "budget.md").read_text().strip() == table.strip()
    with pytest.raises(SystemExit, match="expected comma-separated step counts"):
        budget.budget_main(["--steps", "a lot", "--out", str(out)])


# ---------- the base-model recipe ----------

def test_base_build_labels_attributes_of_single_objects_and_layout_of_the_others():
    """The build's attribute head sees (shape, colour, size) of one-object scenes, -1 (ignored) otherwise; its
    layout head sees (colour, shape) of the leftmost and of the topmost object of multi-object scenes, -1 for one
    object. The layout labels are checked against the scene's coordinates directly."""
    world = data.ShapesDataset("train", size=40, seed=5)
    labelled = base_models._SceneWithAttributes(world)
    for index in range(40):
        _, caption, labels = labelled[index]
        scene = world.scenes[index]
        assert caption == world.captions[index]
        attributes, layout = labels.tolist()[:3], labels.tolist()[3:7]
        assert labels.tolist()[3:] == list(base_models.probe_labels(scene, caption))
        if len(scene) == 1:
            assert attributes == [data.SHAPES.index(scene[0].shape), data.COLORS.index(scene[0].color),
                                  data.SIZES.index(scene[0].size)]
            assert layout == [-1, -1, -1, -1]
        else:
            assert attributes == [-1, -1, -1]
            left = [o for o in scene if all(o.cx <= other.cx for other in scene)][0]
            top = [o for o in scene if all(o.cy <= other.cy for other in scene)][0]
            assert layout == [data.COLORS.index(left.color), data.SHAPES.index(left.shape),
                              data.COLORS.index(top.color), data.SHAPES.index(top.shape)]
    assert any(len(s) == 1 for s in world.scenes) and any(len(s) > 1 for s in world.scenes)


def test_text_side_labels_read_the_caption_in_order():
    """The optional text heads' targets: the first two named objects, what a relation caption says is left / on
    top, and the colour-shape pairs it names (classes colour x 8 + shape)."""
    c, s = data.COLORS.index, data.SHAPES.index
    caption = "a small yellow square below a blue diamond"
    assert base_models.mention_labels(caption) == (c("yellow"), s("square"), c("blue"), s("diamond"))
    assert base_models.caption_layout_labels(caption) == (-1, -1, c("blue"), s("diamond"))
    assert base_models.caption_layout_labels("a green ring to the right of a red star") == (c("red"), s("star"), -1, -1)
    assert base_models.caption_layout_labels("the red circle and the blue square") == (-1, -1, -1, -1)
    assert base_models.pair_labels(base_models.caption_pairs(caption)) == tuple(sorted(
        (c("yellow") * len(data.SHAPES) + s("square"), c("blue") * len(data.SHAPES) + s("diamond")))) + (-1, -1)
    assert base_models.mention_labels("a small blue star") == (-1, -1, -1, -1)


def test_base_batches_are_a_pure_function_of_the_step():
    first = base_models._base_batch_indices(0, 8, one_object_steps=2)
    assert first == [("one", i) for i in range(8)]
    mixed = base_models._base_batch_indices(3, 8, one_object_steps=2, twin_pairs=1)   # phase 2, second step
    assert [s for s, _ in mixed] == ["one"] * 4 + ["world"] * 2 + ["twins"] * 2
    assert [i for s, i in mixed if s == "one"] == list(range(2 * 8 + 4, 2 * 8 + 8))
    assert [i for s, i in mixed if s == "world"] == [2, 3]
    assert [i for s, i in mixed if s == "twins"] == [2, 3]                    # one whole pair


def test_layout_twin_keeps_the_objects_and_changes_the_axis():
    rng = random.Random(0)
    horizontal = ("to the left of", "to the right of")
    for _ in range(50):
        scene = data.sample_scene(rng, n_objects=2)
        twin = data.relayout_twin(scene, rng)
        assert [(o.shape, o.color, o.size) for o in twin] == [(o.shape, o.color, o.size) for o in scene]
        assert (data.relation_between(*scene) in horizontal) != (data.relation_between(*twin) in horizontal)


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_base_recipe_learns_and_resumes(arch, tmp_path, monkeypatch):
    """A short version of `python -m lab.base_models`: colour recognition rises from chance (direction, not
    the shipped numbers); interrupted right after its step-20 checkpoint and called again, it continues from
    its .partial state. The closing suite runs on 300 scenes and 200 single objects to keep the test short."""
    monkeypatch.setattr(ev, "shapes_suite", functools.partial(ev.shapes_suite, n_scenes=300,
                                                                      n_singles=200))
    torch.manual_seed(0)
    path = str(tmp_path / "base.pt")
    kwargs = dict(arch=arch, steps=40, one_object_steps=20, batch_size=32, twin_pairs=4, warmup=5,
                  checkpoint_every=20, progress=False)
    real_save = common._atomic_torch_save
    calls = []

    def stop_after_first_checkpoint(obj, where):
        real_save(obj, where)
        calls.append(where)
        if where.endswith(".partial") and len(calls) == 1:
            raise KeyboardInterrupt   # as if the process died right after the step-20 checkpoint

    common._atomic_torch_save = stop_after_first_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            base_models.build_shapes_base(path, **kwargs)
        assert os.path.exists(path + ".partial") and not os.path.exists(path)
        sidecar = base_models.build_shapes_base(path, **kwargs)   # resumes from step 20
    finally:
        common._atomic_torch_save = real_save
    assert not os.path.exists(path + ".partial")
    suite = sidecar["shapes_suite"]
    assert sidecar["sha256"] == common._sha256(path)
    assert suite["zeroshot_color"] > 2 * 100 / len(data.COLORS), suite   # chance is 12.5%
    assert sidecar["history"] == [] and sidecar["steps"] == 40
    model = open_clip.create_model(common.SHAPES_BASE_ARCHS[arch], pretrained=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---------- the GPU check, dry run ----------

def test_gpu_check_dry_run_runs_every_method_and_the_harness(tmp_path, capsys):
    """`python -m lab.gpu_check --dry-run`: the GPU check's whole path on the CPU (tiny model, 2 steps of 4):
    synthetic COCO and DOCCI files, GOAL's LISM step, each method script with its real-data defaults, the plain
    CLIP step it is compared with, DeGLA once more with --accum-freq 2, and the harness on a SugarCrepe-format
    fixture."""
    from lab import gpu_check
    rows = gpu_check.main(["--dry-run", "--work-dir", str(tmp_path / "work")])
    methods = [row.split("|")[1].strip() for row in rows[2:]]
    assert methods == ["degla", "cehn", "c2lip", "goal", "degla, --accum-freq 2"]
    assert all(row.split("|")[7].strip() == "yes" for row in rows[2:]), rows   # every loss finite
    assert "evaluation harness, SugarCrepe format: 77 items" in capsys.readouterr().out


# ------------------------------------------------------------------ forgetting: held-out colours and shapes
def test_holdout_scenes_never_show_the_held_out_words_and_stay_a_function_of_the_seed():
    held = data.ShapesDataset("train", size=300, seed=3, holdout=("purple", "star"))
    assert not any(o.color == "purple" or o.shape == "star" for scene in held.scenes for o in scene)
    assert not any("purple" in c or "star" in c for c in held.captions)
    assert held.captions == data.ShapesDataset("train", size=300, seed=3, holdout=("purple", "star")).captions
    free = data.ShapesDataset("train", size=300, seed=3)   # a scene without held-out words is left as it was
    kept = [i for i, scene in enumerate(free.scenes) if not any(o.color == "purple" or o.shape == "star" for o in scene)]
    assert kept and all(held.captions[i] == free.captions[i] for i in kept)
    for bad in (("pink",), data.COLORS):
        with pytest.raises(data.DataError, match="expected some"):
            data.ShapesDataset("train", size=2, holdout=bad)


def test_forgetting_table_pairs_seeds_and_reads_the_runs_scores(tmp_path):
    """forgetting.json as score_run writes it, for plain (forgets: 90, 92, 94 on the held-out colour) and DeGLA
    (98, 99, 100): paired +8, +7, +6 against spreads of 4 and 2 -> beats."""
    runs = {}
    for method, values in (("plain", (90.0, 92.0, 94.0)), ("degla", (98.0, 99.0, 100.0))):
        runs[method] = []
        for seed, value in enumerate(values):
            run = tmp_path / f"{method}-seed{seed}"
            run.mkdir()
            (run / "config.json").write_text(json.dumps({"method": "degla", "seed": seed}))
            scores = {key: value for key in forgetting.SCORES} | {"n held out": 5, "n seen": 7}
            base = {key: 100.0 for key in forgetting.SCORES} | {"n held out": 5, "n seen": 7}
            (run / "forgetting.json").write_text(json.dumps({"holdout": ["purple"], "before": base, "after": scores}))
            runs[method].append(run)
    table = forgetting.forgetting_table(runs)
    assert "| colour held out | 100.00 | 92.0 ± 2.0 | 99.0 ± 1.0 |" in table
    assert "| degla | plain | colour held out | 92.0 ± 2.0 | 99.0 ± 1.0 | 7.0 ± 1.0 | yes |" in table
    run = tmp_path / "no-holdout"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "degla", "model": "shapes-tiny-vit"}))
    with pytest.raises(SystemExit, match="without --shapes-holdout"):
        forgetting.score_run(run)
