"""The exported run folder is an open_clip model: one documented line loads exactly the trained model.

A fresh interpreter that knows nothing of this repository (no `add_model_config`, no `shapes-tiny-*` names, not
even the repository on its path) loads the folder with `local-dir:` and computes the same image and text
features as the model that was exported, with GOAL's stretched context (104 positions instead of 32) intact.
"""
import os
import subprocess
import sys

import open_clip
import pytest
import torch

import common
import goal

# The line of README.md ("Using a trained model"), with the folder as the script's argument.
FRESH_INTERPRETER = """
import sys, open_clip, torch
folder, inputs, outputs = sys.argv[1:]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
images, captions = torch.load(inputs)
model.eval()
with torch.no_grad():
    torch.save({"image": model.encode_image(images), "text": model.encode_text(tokenizer(captions)),
                "context": tokenizer.context_length}, outputs)
"""


def test_exported_folder_loads_the_trained_model_in_a_fresh_interpreter(tmp_path):
    model, _, _, _ = common.create_backbone(common.TINY_MODEL, None)
    goal.stretch_text_positions(model, 104, 8)          # GOAL's tiny-model stretch: 32 -> 104 positions
    tokenizer = open_clip.get_tokenizer(common.TINY_MODEL, context_length=104)
    run = tmp_path / "run"
    os.makedirs(run)
    common.export_open_clip(model, str(run / "final.pt"), common.TINY_MODEL, tokenizer, meta={"method": "test"})
    long_caption = " ".join(["a small red circle to the left of a large blue square."] * 6)   # > 32 tokens
    images, captions = torch.randn(2, 3, 64, 64), [long_caption, "a blue star"]
    torch.save((images, captions), tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, str(run), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = torch.load(tmp_path / "outputs.pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded["image"], model.encode_image(images))
        torch.testing.assert_close(reloaded["text"], model.encode_text(tokenizer(captions)))
    assert reloaded["context"] == 104
    # the old way, a model name plus final.pt, would cut the 104 trained positions back to 32: refused, with the fix
    with pytest.raises(common.InputError, match=f"context of 104 tokens.*--model local-dir:{run}"):
        common.create_backbone(common.TINY_MODEL, str(run / "final.pt"))
