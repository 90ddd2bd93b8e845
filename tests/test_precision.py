"""Mixed precision in the training loops: forward passes under autocast, loss math in fp32
outside it, and the GradScaler stepping the optimizer under fp16, in every method script.

CPU runs are fp32 (`--precision` bf16/fp16 need a GPU), so the test stands in CPU bf16 autocast for the run's
autocast and a CPU GradScaler for its scaler, trains one tiny step and records what the loss function saw."""
import pytest
import torch

import c2lip
import cehn
import common
import goal

LOSSES = {"cehn": (cehn, "cehn_loss"), "c2lip": (c2lip, "c2lip_loss"), "goal": (goal, "goal_loss")}


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_loss_in_fp32_outside_autocast_and_scaler_steps(method, tmp_path, monkeypatch):
    steps, seen = [], []
    original_init = common.Run.__init__

    def init(self, args, method):
        original_init(self, args, method)
        self.scaler = torch.amp.GradScaler("cpu")
        scaler_step = self.scaler.step
        self.scaler.step = lambda optimizer: steps.append(scaler_step(optimizer))

    def recording(function):
        def wrapper(*args, **kwargs):
            dtypes = {t.dtype for t in list(args) + list(kwargs.values()) if torch.is_tensor(t) and t.is_floating_point()}
            seen.append((function.__name__, torch.is_autocast_enabled("cpu"), dtypes))
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(common.Run, "__init__", init)
    monkeypatch.setattr(common.Run, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    module, loss_name = LOSSES[method]
    monkeypatch.setattr(module, loss_name, recording(getattr(module, loss_name)))
    monkeypatch.setattr(c2lip.ConceptLogits, "calibrate_", recording(c2lip.ConceptLogits.calibrate_))
    clip_base = ["--model", "shapes-tiny-vit"] if method == "c2lip" else []   # calibrate_ runs for CLIP models
    args = module.parse_args(["--steps", "1", "--batch-size", "2", "--train-size", "4", "--eval", "", *clip_base,
                              "--no-progress", "--save-every", "0", "--out", str(tmp_path / "run")])
    module.train(args)
    assert len(steps) == 1   # the optimizer stepped through the scaler
    assert {name for name, _, _ in seen} >= {loss_name} | ({"calibrate_"} if method == "c2lip" else set())
    for name, autocast_on, dtypes in seen:
        assert not autocast_on and dtypes <= {torch.float32}, (name, autocast_on, dtypes)
