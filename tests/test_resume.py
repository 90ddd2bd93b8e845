"""Resume: which flags come back from the run's config.json, each rank's RNG state, and augmentations that do not
depend on the data-loader workers (fast; the SIGKILL + resume of the real scripts is in test_end_to_end.py)."""
import argparse
import json
import random

import numpy as np
import torch

import c2lip
import common
import degla


def _run_folder(tmp_path, **config):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "degla", "out": "/moved/elsewhere", **config}))
    return str(folder)


def test_resumed_run_keeps_its_flags_and_given_flags_win(tmp_path):
    fresh = degla.parse_args([])
    assert (fresh.log_every, fresh.tgc_mask, fresh.no_progress, fresh.gpus) == (10, "own", False, 0)
    folder = _run_folder(tmp_path, log_every=3, tgc_mask="tile_as_released", no_progress=True, batch_size=4,
                         dist_timeout=60.0)
    resumed = degla.parse_args(["--resume", folder])
    assert (resumed.log_every, resumed.tgc_mask, resumed.no_progress, resumed.batch_size) == \
        (3, "tile_as_released", True, 4)
    assert resumed.dist_timeout == 60.0
    assert resumed.out is None   # `Run` continues in the resumed folder, not in the path the run started in
    given = degla.parse_args(["--resume", folder, "--log-every", "10", "--tgc-mask", "own", "--batch-size", "8"])
    assert (given.log_every, given.tgc_mask, given.no_progress, given.batch_size) == (10, "own", True, 8)


def test_resumed_c2lip_keeps_its_switch(tmp_path):
    assert c2lip.parse_args([]).xac_recompute is False
    assert c2lip.parse_args(["--resume", _run_folder(tmp_path, xac_recompute=True)]).xac_recompute is True
    # the off-form wins over the resumed run's saved switch
    assert c2lip.parse_args(["--resume", str(tmp_path / "run"), "--no-xac-recompute"]).xac_recompute is False


def test_resumed_goal_switch_has_an_off_form(tmp_path):
    import goal
    folder = _run_folder(tmp_path, released_box_mapping=True)
    assert goal.parse_args(["--resume", folder]).released_box_mapping is True
    assert goal.parse_args(["--resume", folder, "--no-released-box-mapping"]).released_box_mapping is False
    assert goal.parse_args([]).released_box_mapping is False


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


class _FakeRun:
    def __init__(self, tmp_path, rank, world_size):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.method, self.out, self.scaler, self.device = "test", str(tmp_path), None, "cpu"
        self.args = argparse.Namespace(resume=str(tmp_path), seed=0)
        self.printed = []

    def print(self, *text):
        self.printed.append(" ".join(map(str, text)))


def test_each_rank_resumes_with_its_own_rng_state(tmp_path, monkeypatch):
    states, expected = [], []
    for rank in range(2):   # what two ranks hold when the checkpoint is written
        common.seed_everything(100 + rank)
        states.append(common.rng_state())
        expected.append(_draws())
    assert expected[0] != expected[1]
    assert len(common.gather_rng_states()) == 1   # no process group: this process alone
    monkeypatch.setattr(common, "gather_rng_states", lambda: states)
    model = torch.nn.Linear(2, 2)
    optimizer = common.make_optimizer(model, lr=1e-3, wd=0.1)
    scheduler = common.cosine_schedule(optimizer, warmup=1, total=4)
    common.save_checkpoint(_FakeRun(tmp_path, 0, 2), 3, model, optimizer, scheduler)
    for rank in range(2):
        common.seed_everything(7)   # whatever the process did before resuming
        run = _FakeRun(tmp_path, rank, 2)
        assert common.resume(run, model, optimizer, scheduler)[0] == 3
        assert _draws() == expected[rank], rank
        assert not any("warning" in line for line in run.printed)
    # checkpoints written before the per-rank states held rank 0's state alone
    assert common.rank_rng_state(states[0], 0) is states[0]
    assert common.rank_rng_state(states[0], 1) is None
    # resumed in another number of processes: every rank keeps its fresh seed and says so
    common.seed_everything(7)
    other = _FakeRun(tmp_path, 0, 3)
    common.resume(other, model, optimizer, scheduler)
    assert any("2 process(es), this run has 3" in line for line in other.printed)


class _RandomCrops(torch.utils.data.Dataset):
    """A sample whose value is drawn from the global RNGs, as a random crop or flip is."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        return {"x": torch.tensor([index + torch.rand(1).item(), random.random(), np.random.rand()])}


def _stream(start, workers):
    collate = lambda batch: {"x": torch.stack([s["x"] for s in batch])}   # noqa: E731
    return {step: batch["x"] for step, _, batch in common.batch_stream(_RandomCrops(), collate, 4, 5, start, 9, workers)}


def test_augmentations_of_a_resumed_stream_do_not_depend_on_the_workers():
    straight = _stream(0, workers=2)   # 6 steps per epoch: the resume at step 4 is in the middle of one
    resumed = _stream(4, workers=2)
    in_process = _stream(0, workers=0)
    for step in range(9):
        assert torch.equal(straight[step], in_process[step]), step
    for step in range(4, 9):
        assert torch.equal(straight[step], resumed[step]), step
    common.seed_everything(3)
    before = _draws()
    common.seed_everything(3)
    _stream(0, workers=0)
    assert _draws() == before   # loading samples leaves the training process's random numbers alone
