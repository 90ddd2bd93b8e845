"""Tests for `python eval.py figure --kind KIND`: each picture renders on the shipped base with the pixel size its
layout gives, and draws what it says (the scored rows, the attention maps, the LISM decision of goal.py itself).

Kept cheap on purpose (the whole file in a few seconds): one base model for all, before-only or before = after."""
import json

import pytest
import torch
from PIL import Image

import cehn
import common
import data
import degla
import eval as ev
import goal


@pytest.fixture(scope="module")
def base(shapes_base):
    """The shipped CLIP base as a figure column (loaded once for the file)."""
    return ev.load_figure_model("shapes", "shapes-tiny-vit", role="before", device="cpu")


def test_failure_figure(tmp_path, base):
    out = tmp_path / "failure.png"
    # the first 150 test scenes: their swap_att items are the first items of the whole suite, so the item is the same
    info = ev.failure_figure(base.model, base.tokenizer, base.transform, out, device="cpu", n_scenes=150)
    assert Image.open(out).size == (900, 300)
    assert info["neg_score"] >= info["pos_score"]   # the picture shows a real failure


def test_negatives_figure_degla_before_only(tmp_path, base):
    out = tmp_path / "negatives.png"
    info = ev.negatives_figure(base, None, out, method="degla", device="cpu")
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
    info = ev.negatives_figure(base, base, out, method="cehn", log_path=log, device="cpu")
    assert Image.open(out).size == (1250, 470 + 280)   # NEGATIVES_SIZE plus the thresholds panel
    assert info["types"] == list(data.CEHN_TYPES) and info["thresholds"] == list(cehn.NEG_TYPES)
    assert len(info["rows"]) == 1 + len(info["types"]) - len(info["invalid"])
    assert all(r["before"] == pytest.approx(r["after"]) for r in info["rows"])   # before = after = the base
    assert ev.read_thresholds(log)[1] == ("attribute", [0, 1, 2, 3], [1.0, 1.5, 2.0, 2.5])
    no_theta = tmp_path / "plain.jsonl"
    no_theta.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with pytest.raises(ev.BenchmarkDataError, match="theta"):
        ev.negatives_figure(base, None, tmp_path / "x.png", method="cehn", log_path=no_theta, device="cpu")


def test_c2lip_figure(tmp_path, base):
    out = tmp_path / "c2lip.png"
    info = ev.c2lip_figure(base, base, out, device="cpu")
    assert info["concepts"] == data.extract_concepts([info["caption"]], progress=False)[0]
    assert Image.open(out).size == (1120, 130 + 240 * len(info["concepts"]) + 100)   # C2LIP_TOP + rows + BOTTOM
    attention = torch.tensor(info["before"]["attention"])
    assert attention.shape == (len(info["concepts"]), info["grid"] ** 2) == (len(info["concepts"]), 64)
    assert torch.allclose(attention.sum(-1), torch.ones(len(info["concepts"])), atol=1e-5)
    assert info["after"]["attention"] == info["before"]["attention"]


def test_goal_figure_is_goal_lism(tmp_path, base):
    out = tmp_path / "goal.png"
    info = ev.goal_figure(base, None, out, device="cpu")
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
