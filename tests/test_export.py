"""The exported run folder is the way to load a trained model: loading its final.pt under a model name instead
would cut GOAL's stretched text positions back to the name's context, so that is refused, with the fix.

That the folder loads exactly the trained model in a fresh interpreter (the one documented line, nothing of this
repository importable, GOAL's 104 positions intact) is proved on real-data runs of all four methods in
test_end_to_end.py.
"""
import os

import open_clip
import pytest

import common
import goal


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
