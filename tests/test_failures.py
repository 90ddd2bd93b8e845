"""Failure behaviour of a real method script (degla.py, the most stateful one: EMA teacher + negatives).

- a loss that becomes NaN stops the run with a message naming the step and the loss terms, and the last
  checkpoint stays intact;
- wrong inputs each give one clear error (exit code 2 or a SystemExit message, no traceback).
A run killed with SIGKILL and resumed, for all four methods on real-data files, is in test_end_to_end.py (that
augmentations do not depend on the data-loader workers, also after a resume: test_resume.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _degla_command(base, out, steps=10):
    return [sys.executable, os.path.join(ROOT, "degla.py"), "--pretrained", base, "--steps", str(steps),
            "--batch-size", "8", "--train-size", "96", "--save-every", "2", "--log-every", "1", "--eval", "",
            "--no-progress", "--out", str(out)]


def test_nan_loss_stops_with_step_and_terms_and_keeps_checkpoint(shapes_base, tmp_path, monkeypatch):
    import degla
    real_loss, calls = degla.degla_loss, []

    def loss_that_turns_nan(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 6:   # the 6th step (step index 5) produces NaN
            loss = loss * float("nan")
            parts = dict(parts, igc=float("nan"))
        return loss, parts

    monkeypatch.setattr(degla, "degla_loss", loss_that_turns_nan)
    args = degla.parse_args(_degla_command(shapes_base, tmp_path / "run")[2:])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5: .*igc=nan"):
        degla.train(args)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 4     # saved after steps 2 and 4; nothing written after the NaN
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _coco_fixture(root, image_ids=(1, 2)):
    """A tiny COCO 2014 layout: annotations/captions_train2014.json + train2014/ images."""
    from PIL import Image
    os.makedirs(root / "annotations"), os.makedirs(root / "train2014")
    images, annotations = [], []
    for n, image_id in enumerate(image_ids):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.new("RGB", (32, 32), (40 * n, 80, 120)).save(root / "train2014" / name)
        images.append({"id": image_id, "file_name": name, "height": 32, "width": 32})
        annotations.append({"id": 100 + n, "image_id": image_id, "caption": f"a red ball next to a dog number {n}"})
    (root / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))


def _fails_clearly(command, expected, cwd=None):
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _fails_clearly_in_process(capsys, argv, expected):
    """The same checks as `_fails_clearly`, through degla.main in this process (no interpreter start-up)."""
    import degla
    with pytest.raises(SystemExit) as exit_info:
        degla.main(argv)
    code = exit_info.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")   # sys.exit(text) prints text at exit
    assert code not in (0, None) and expected in err and "Traceback" not in err, err[-2000:]


def test_wrong_inputs_give_one_clear_error(shapes_base, tmp_path, capsys):
    flags = ["--no-progress", "--eval", "", "--out", str(tmp_path / "out"), "--train-size", "96", "--steps", "2",
             "--batch-size", "8"]
    # a missing data root, through the real command line (exit code, stderr, no traceback)
    _fails_clearly([sys.executable, os.path.join(ROOT, "degla.py")] + flags
                   + ["--data", "coco", "--data-root", str(tmp_path / "nowhere"), "--pretrained", "none",
                      "--model", "shapes-tiny-vit"], "nowhere")
    # the rest in-process: the same main() and error wrapper, without six interpreter start-ups
    # a captions file in the wrong format
    bad = tmp_path / "bad"
    os.makedirs(bad / "annotations")
    (bad / "annotations" / "captions_train2014.json").write_text(json.dumps([{"caption": "not the COCO format"}]))
    _fails_clearly_in_process(capsys, flags + ["--data", "coco", "--data-root", str(bad), "--pretrained", "none",
                                               "--model", "shapes-tiny-vit"], "captions_train2014.json")
    # a negatives file whose image ids are absent from the COCO annotations
    coco = tmp_path / "coco"
    _coco_fixture(coco)
    negatives = tmp_path / "DeGLA.json"
    negatives.write_text(json.dumps([{"image_id": 999, "original": "a cat", "enhanced": ["a dog"] * 4}]))
    _fails_clearly_in_process(capsys, flags + ["--data", "coco", "--data-root", str(coco), "--negatives",
                                               str(negatives), "--pretrained", "none", "--model", "shapes-tiny-vit"],
                              "999")
    # an unknown model name
    _fails_clearly_in_process(capsys, flags + ["--model", "ViT-Imaginary-99", "--pretrained", "none"], "unknown model")
    # --gpus 8 on a machine without (8) GPUs
    _fails_clearly_in_process(capsys, flags + ["--gpus", "8"], "--gpus 8")
    # --resume with a run folder written by another method
    other = tmp_path / "cehn-run"
    os.makedirs(other)
    torch.save({"method": "cehn", "step": 3}, other / "checkpoint.pt")
    _fails_clearly_in_process(capsys, [a for a in flags if a not in ("--out", str(tmp_path / "out"))]
                              + ["--resume", str(other), "--pretrained", shapes_base], "written by 'cehn'")


@pytest.mark.parametrize("launcher", ["torchrun", "cpu-procs"])
def test_bad_input_read_by_rank_0_ends_every_rank_with_one_message(launcher, tmp_path):
    """`goal.py --lism MISSING.json` on 2 processes: rank 0 reads the file first (inside main_process_first) and
    stops with the loader's message; rank 1, waiting for it, leaves with the same exit code instead of dying in a
    collective with "Connection reset by peer". Under torchrun and under --cpu-procs (mp.spawn)."""
    missing = str(tmp_path / "missing.json")
    flags = ["--lism", missing, "--steps", "2", "--batch-size", "2", "--train-size", "8", "--eval", "",
             "--no-progress", "--out", str(tmp_path / "run")]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(20000 + os.getpid() % 20000), os.path.join(ROOT, "goal.py"), *flags]
    else:
        command = [sys.executable, os.path.join(ROOT, "goal.py"), "--cpu-procs", "2", *flags]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    printed = done.stdout + done.stderr
    assert done.returncode != 0
    assert printed.count(f"not found: {missing}") == 1, printed[-3000:]
    assert "Connection reset" not in printed and 'File "' + os.path.join(ROOT, "goal.py") not in printed, printed[-3000:]
    if launcher == "cpu-procs":
        assert done.returncode == 2 and "Traceback" not in printed, printed[-3000:]
