"""Every method script trains the SigLIP base under DistributedDataParallel: 2 CPU processes (gloo), a few steps.

DeGLA's, CE-CLIP's and GOAL's losses are softmax (InfoNCE) losses that never read SigLIP's `logit_bias`; left
trainable it would get no gradient and DDP would stop at the second step (open_clip issue 1076), so those scripts
freeze it (`common.freeze_logit_bias`) and the exported model keeps the base's value. C2LIP's sigmoid losses train
it. Each case is the script's `main([... '--cpu-procs', '2' ...])`: two real gloo processes."""
import importlib

import pytest
import torch

import common


@pytest.mark.parametrize("method", ["degla", "cehn", "c2lip", "goal"])
def test_two_processes_train_the_siglip_base(method, tmp_path, monkeypatch):
    # the script's main() in this process (an interpreter start less); it spawns the two gloo processes itself
    monkeypatch.setenv("COMPCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    importlib.import_module(method).main(
        ["--model", common.SHAPES_SIGLIP_MODEL, "--cpu-procs", "2", "--steps", "3", "--batch-size", "4",
         "--train-size", "16", "--warmup", "1", "--eval", "", "--save-every", "0", "--no-progress", "--out", str(out)])
    trained = torch.load(out / "final.pt", weights_only=True)["state_dict"]["logit_bias"]
    base = torch.load(common.shapes_base_path(common.SHAPES_SIGLIP_MODEL), weights_only=True)
    base = (base.get("state_dict", base))["logit_bias"].float()
    if method == "c2lip":
        assert not torch.equal(trained.float(), base)   # its sigmoid losses train the bias
    else:
        assert torch.equal(trained.float(), base)       # frozen: no loss of the method reads it
