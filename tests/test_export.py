"""The exported run folder is the way to load a trained model: loading its final.pt under a model name instead
would cut GOAL's stretched text positions back to the name's context, so that is refused, with the fix. So is
loading weights trained with QuickGELU into a GELU config (or the reverse): they fit and would run, wrongly.

That the folder loads exactly the trained model in a fresh interpreter (the one documented line, nothing of this
repository importable, GOAL's 104 positions intact) is proved on real-data runs of all four methods in
test_end_to_end.py.
"""
import json
import os
import shutil

import open_clip
import pytest
import torch

import common
import goal

QUICK = common.TINY_MODEL + "-quickgelu"   # the tiny CLIP with OpenAI's activation, registered by `quick_tiny`


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory):
    """Register shapes-tiny-vit-quickgelu (TINY_MODEL_CONFIG plus quick_gelu, as open_clip's -quickgelu configs
    are) with open_clip for these tests only."""
    path = tmp_path_factory.mktemp("configs") / f"{QUICK}.json"
    path.write_text(json.dumps({**common.TINY_MODEL_CONFIG, "quick_gelu": True}))
    common.register_tiny_model()
    open_clip.add_model_config(path)
    return QUICK


def test_final_pt_under_a_model_name_with_a_shorter_context_is_refused_with_the_folder_to_load(tmp_path):
    model, _, _, _ = common.create_backbone(common.TINY_MODEL, None)
    goal.stretch_text_positions(model, 104, 8)          # GOAL's tiny-model stretch: 32 -> 104 positions
    tokenizer = open_clip.get_tokenizer(common.TINY_MODEL, context_length=104)
    run = tmp_path / "run"
    os.makedirs(run)
    common.export_open_clip(model, str(run / "final.pt"), common.TINY_MODEL, tokenizer, meta={"method": "test"})
    # the old way, a model name plus final.pt, would cut the 104 trained positions back to 32: refused, with the fix
    with pytest.raises(common.InputError, match=f"context of 104 tokens.*--model local-dir:{run}"):
        common.create_backbone(common.TINY_MODEL, str(run / "final.pt"))


def _export(model_name, run):
    model, _, _, tokenizer = common.create_backbone(model_name, None)
    os.makedirs(run)
    common.export_open_clip(model, str(run / "final.pt"), model_name, tokenizer, meta={"method": "test"})
    return run / "final.pt"


def test_quickgelu_weights_into_a_gelu_config_are_refused_with_the_quickgelu_fix(tmp_path, quick_tiny):
    final = _export(quick_tiny, tmp_path / "run")
    fix = f"Use the -quickgelu config: --model {quick_tiny}"
    with pytest.raises(common.InputError, match=f"trained as '{quick_tiny}' with QuickGELU.*{fix}"):
        common.create_backbone(common.TINY_MODEL, str(final))
    # final.pt says what it is wherever it is copied (its meta), without the run folder around it
    alone = tmp_path / "elsewhere" / "weights.pt"
    os.makedirs(alone.parent)
    shutil.copyfile(final, alone)
    with pytest.raises(common.InputError, match=fix):
        common.create_backbone(common.TINY_MODEL, str(alone))
    # a plain state dict in the run folder: the folder's open_clip_config.json tells, and the folder is the other fix
    torch.save(torch.load(final)["state_dict"], tmp_path / "run" / "plain.pt")
    with pytest.raises(common.InputError, match=f"{fix}, or load the run folder.*local-dir:{tmp_path / 'run'}"):
        common.create_backbone(common.TINY_MODEL, str(tmp_path / "run" / "plain.pt"))
    # the matching config loads, with QuickGELU
    model, _, _, _ = common.create_backbone(quick_tiny, str(final))
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_gelu_weights_into_a_quickgelu_config_are_refused_with_the_gelu_fix(tmp_path, quick_tiny, shapes_base):
    final = _export(common.TINY_MODEL, tmp_path / "run")
    with pytest.raises(common.InputError, match=f"with GELU.*uses QuickGELU.*--model {common.TINY_MODEL}"):
        common.create_backbone(quick_tiny, str(final))
    # a run folder that has not finished (config.json only) and the shipped base (its models/*.json sidecar)
    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished)
    (unfinished / "config.json").write_text(json.dumps({"method": "degla", "model": common.TINY_MODEL}))
    torch.save({"state_dict": torch.load(final)["state_dict"]}, unfinished / "checkpoint-epoch1.pt")
    for path in (unfinished / "checkpoint-epoch1.pt", shapes_base):
        with pytest.raises(common.InputError, match=f"Use the GELU config: --model {common.TINY_MODEL}"):
            common.create_backbone(quick_tiny, str(path))
    model, _, _, _ = common.create_backbone(common.TINY_MODEL, str(final))
    assert isinstance(model.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")   # torch.jit.script/save: how OpenAI's files were made
def test_openai_torchscript_checkpoint_into_a_gelu_config_is_refused(tmp_path, quick_tiny):
    """OpenAI's original files (ViT-B-32.pt) are TorchScript archives; open_clip builds them with QuickGELU
    (load_openai_model) and its create_model cannot read one: one message either way, naming the fix."""
    archive = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with pytest.raises(common.InputError, match=f"TorchScript archive.*QuickGELU.*--model {quick_tiny}"):
        common.create_backbone(common.TINY_MODEL, str(archive))
    with pytest.raises(common.InputError, match="does not load.*--pretrained openai"):
        common.create_backbone(quick_tiny, str(archive))
