"""The command line of the four method scripts and eval.py: defaults, --help, and bad input.

- every method's real-data (model, pretrained) pair builds the activation its weights were trained with
  (OpenAI weights use QuickGELU; open_clip only warns when the config says GELU);
- the method's defaults table sets the seed and the precision; flags given on the command line win;
- --help shows the value each flag really gets, never "(default: None)";
- bad input ends in one message and exit code 2 (in-process: the scripts' `main` raises SystemExit(2)).
"""
import json
import os
from types import SimpleNamespace

import open_clip
import pytest
import torch
from PIL import Image

import c2lip
import cehn
import common
import degla
import eval as evaluation
import goal

METHODS = {"degla": (degla, degla._defaults()), "cehn": (cehn, cehn.DEFAULTS), "c2lip": (c2lip, c2lip._defaults()),
           "goal": (goal, goal._defaults())}
REAL_DATA = {"degla": "coco", "cehn": "coco", "c2lip": "coco", "goal": "docci"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_default_model_has_the_activation_of_its_weights(method):
    """open_clip's own check (factory.create_model warns on a quick_gelu mismatch), without downloading weights."""
    table = METHODS[method][1]["real"]
    model, tag = table["model"], table["pretrained"]
    config = open_clip.get_model_config(model)
    tag_config = open_clip.pretrained.get_pretrained_cfg(model, tag)
    assert config is not None and tag_config, f"{method}: {model}/{tag} is not an open_clip (model, tag) pair"
    assert config.get("quick_gelu", False) == tag_config.get("quick_gelu", False), f"{method}: {model}/{tag}"
    if tag == "openai":
        assert model.endswith("-quickgelu"), method


def test_method_table_sets_seed_and_precision_and_flags_win(monkeypatch, tmp_path):
    official_seed = {"degla": 42, "cehn": 42, "c2lip": 42, "goal": 1337}
    for method, (module, _) in METHODS.items():
        assert module.parse_args(["--data", REAL_DATA[method]]).seed == official_seed[method], method
        assert module.parse_args([]).seed == 0, method             # the shapes world keeps its seed
        assert module.parse_args(["--data", REAL_DATA[method], "--seed", "7"]).seed == 7, method
    # GOAL's bf16 (its release) applies on CUDA; on CPU the default stays auto (fp32), where bf16 would stop the run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert goal.parse_args(["--data", "docci"]).precision == "bf16"
    assert goal.parse_args(["--data", "docci", "--precision", "fp32"]).precision == "fp32"
    assert degla.parse_args(["--data", "coco"]).precision == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert goal.parse_args(["--data", "docci"]).precision == "auto"
    # a resumed run keeps its own seed (config.json), the table comes after it
    (tmp_path / "config.json").write_text(json.dumps({"method": "goal", "data": "docci", "seed": 5}))
    assert goal.parse_args(["--resume", str(tmp_path)]).seed == 5


def test_help_shows_real_defaults_and_teaches(capsys):
    for method, (module, _) in METHODS.items():
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args(["--help"])
        assert exit_info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text, method
        for phrase in ("peak learning rate", "weight decay", "needs --eval-root", "--eval '' skips", "sugarcrepe",
                       "torchrun --nproc_per_node N", "42 on real data" if method != "goal" else "1337 on real data"):
            assert phrase in text, (method, phrase)
    with pytest.raises(evaluation.BenchmarkDataError, match="--eval-root in the method scripts"):
        evaluation._require(SimpleNamespace(root=None), "sugarcrepe", ["sugarcrepe"], "RAIVNLab/sugar-crepe")


def _exits_2(capsys, main, argv, *expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    for text in expected:
        assert text in err, err[-2000:]


def _docci(root):
    os.makedirs(root / "images")
    Image.new("RGB", (64, 32)).save(root / "images" / "a.jpg")
    record = {"example_id": "a", "split": "train", "image_file": "a.jpg", "description": "A cat. A dog."}
    (root / "docci_descriptions.jsonlines").write_text(json.dumps(record) + "\n")


def test_bad_input_gives_one_message_and_exit_code_2(tmp_path, capsys):
    tiny = ["--model", common.TINY_MODEL, "--pretrained", "none"]
    _exits_2(capsys, degla.main, ["--pretrained", str(tmp_path / "missing.pt"), "--model", common.TINY_MODEL,
                                  "--eval", "", "--out", str(tmp_path / "run")], "no such file")
    docci = tmp_path / "docci"
    _docci(docci)
    _exits_2(capsys, goal.main, ["lism", "--data", "docci", "--data-root", str(docci), *tiny], "needs --segments-file")
    _exits_2(capsys, goal.main, ["lism", "--data", "docci", "--data-root", str(docci), *tiny, "--segments-file",
                                 str(tmp_path / "missing.json")], "missing.json")
    pair = {"sentence": "A cat.", "box": [0, 0, 8, 8]}
    (tmp_path / "lism.json").write_text(json.dumps({"images/a.jpg": {"boxes": [], "pairs": [pair]}}))
    _exits_2(capsys, goal.main, ["--data", "docci", "--data-root", str(docci), "--split", "validation", "--lism",
                                 str(tmp_path / "lism.json"), *tiny, "--eval", "", "--out", str(tmp_path / "goal")],
             "no records of split 'validation'; its splits: train")
    # a run's checkpoint.pt given to eval.py: say what it is and what to use instead
    run = tmp_path / "degla-run"
    os.makedirs(run)
    (run / "config.json").write_text(json.dumps({"method": "degla"}))
    torch.save({"method": "degla", "step": 1, "model": {}, "rng": common.rng_state()}, run / "checkpoint.pt")
    _exits_2(capsys, evaluation.main, ["--model", common.TINY_MODEL, "--pretrained", str(run / "checkpoint.pt")],
             "is a training checkpoint", f"--pretrained {run / 'final.pt'}", f"python degla.py --resume {run}")


def test_offline_pretrained_tag_is_one_message(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    monkeypatch.setattr(common, "_hub_reachable", lambda timeout=3.0: True)   # the download itself fails
    with pytest.raises(common.InputError, match="needs the internet once"):
        common.create_backbone("ViT-B-32-quickgelu", "openai")


def test_unreachable_hub_reads_the_cache_only_instead_of_retrying(monkeypatch):
    """Without a network open_clip's download would retry for about 50 s: when huggingface.co does not answer,
    the load runs in Hugging Face's offline mode (cache only) and the offline mode is switched back after."""
    import huggingface_hub.constants
    seen = []

    def cache_only(*args, **kwargs):
        seen.append(huggingface_hub.constants.is_offline_mode())
        raise RuntimeError("Cannot find the requested files in the local cache")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", cache_only)
    monkeypatch.setattr(common, "_hub_reachable", lambda timeout=3.0: False)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(common.InputError, match="huggingface.co is not reachable"):
        common.create_backbone("ViT-B-32-quickgelu", "openai")
    assert seen == [True] and huggingface_hub.constants.HF_HUB_OFFLINE == before


def _no_model(*args, **kwargs):
    raise AssertionError("a model was built before the bad input was reported")


def test_openai_tag_on_a_gelu_config_is_one_message_naming_the_quickgelu_config(capsys, monkeypatch):
    """open_clip 3.3 only warns when a tag's activation differs from the config's and loads the weights anyway:
    refused before anything is downloaded or built, with the -quickgelu fix."""
    monkeypatch.setattr(open_clip, "create_model_and_transforms", _no_model)
    monkeypatch.setattr(common, "_hub_reachable", _no_model)
    with pytest.raises(common.InputError, match="--pretrained openai .*QuickGELU.*--model ViT-B-32-quickgelu"):
        common.create_backbone("ViT-B-32", "openai")
    _exits_2(capsys, evaluation.main, ["--model", "ViT-B-16", "--pretrained", "openai"],
             "uses GELU", "Use the -quickgelu config: --model ViT-B-16-quickgelu")
    common._check_activation("ViT-B-32-quickgelu", "openai", False, {})           # the matching pair passes
    common._check_activation("ViT-B-32", "openai", False, {"force_quick_gelu": True})


def test_bad_eval_root_and_resume_stop_before_any_work_and_leave_no_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # where runs/<method>-... would appear
    coco = tmp_path / "coco"      # never read: the checks come first
    interrupted = tmp_path / "interrupted"
    os.makedirs(interrupted)
    (interrupted / "config.json").write_text(json.dumps({"method": "degla"}))
    monkeypatch.setattr(common, "create_backbone", _no_model)
    for method, (module, _) in METHODS.items():
        data_flags = ["--data", REAL_DATA[method], "--data-root", str(coco)]
        _exits_2(capsys, module.main, data_flags, "--eval-root DIR")
        _exits_2(capsys, module.main, data_flags + ["--eval", "sugarcrepe", "--eval-root", str(tmp_path / "no")],
                 "--eval-root", "no such folder")
        _exits_2(capsys, module.main, ["--resume", str(interrupted), "--eval", ""], "no checkpoint there")
    assert sorted(os.listdir(tmp_path)) == ["interrupted"] and os.listdir(interrupted) == ["config.json"]


def test_a_start_that_fails_on_its_data_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    _exits_2(capsys, degla.main, ["--data", "coco", "--data-root", str(tmp_path / "nowhere"), "--eval", "",
                                  "--model", common.TINY_MODEL, "--pretrained", "none", "--out", str(out)], "nowhere")
    assert not out.exists()


class _Reached(Exception):
    pass


def test_pretrained_shapes_with_real_data_is_accepted_by_every_method(tmp_path, monkeypatch):
    """A user's choice (e.g. the tiny shapes base on real files, to try the pipeline): no method refuses it."""
    def reached(name, pretrained, *args, **kwargs):
        assert pretrained == "shapes"
        raise _Reached
    monkeypatch.setattr(common, "create_backbone", reached)
    for method, (module, _) in METHODS.items():
        lism = ["--lism", "lism.json"] if method == "goal" else []   # GOAL's real data needs one (read later)
        with pytest.raises(_Reached):
            module.main(["--data", REAL_DATA[method], "--data-root", str(tmp_path), "--model", common.TINY_MODEL,
                         "--pretrained", "shapes", "--eval", ""] + lism)


def test_lism_file_without_pairs_or_with_other_keys_says_what_is_wrong(tmp_path, capsys):
    docci = tmp_path / "docci"
    _docci(docci)
    run = ["--data", "docci", "--data-root", str(docci), "--model", common.TINY_MODEL, "--pretrained", "none",
           "--eval", "", "--out", str(tmp_path / "run")]
    (tmp_path / "boxes.json").write_text(json.dumps({"images/a.jpg": [[0, 0, 8, 8]]}))   # a --segments-file
    _exits_2(capsys, goal.main, run + ["--lism", str(tmp_path / "boxes.json")], "only candidate boxes",
             "python goal.py lism --segments-file")
    pair = {"sentence": "A cat.", "box": [0, 0, 8, 8]}
    (tmp_path / "other.json").write_text(json.dumps({"images/zebra.jpg": {"boxes": [], "pairs": [pair]}}))
    _exits_2(capsys, goal.main, run + ["--lism", str(tmp_path / "other.json")], "none of its entries names an image",
             "images/zebra.jpg")
    assert not (tmp_path / "run").exists()
