"""Does the GPU path run? Every method for a few dozen steps on one CUDA device, at its paper's per-GPU batch.

    python -m lab.gpu_check                 # one CUDA device: ViT-B-32-quickgelu (random init), bf16, 40 steps each
    python -m lab.gpu_check --dry-run       # the same path on the CPU: the tiny model, 2 steps, batch 4 (GOAL 2; tests)

No weights and no data are downloaded: the script writes synthetic files in the official formats (COCO 2014
captions for DeGLA, CE-CLIP and C2LIP; DOCCI with candidate boxes for GOAL, whose LISM pairs `goal.py lism` then
makes), runs each method script as a subprocess with its real-data defaults (`--data coco`, the paper's optimizer
and per-GPU batch), and prints per method:

    samples/s, ms per step against a plain open_clip CLIP step (InfoNCE) on the same model, batch and precision,
    peak GPU memory, and whether the loss stayed finite and fell (mean of the last quarter of the logged steps
    below the first quarter's)

then the evaluation harness on a SugarCrepe-format fixture (items/s). The loss on random weights and synthetic
captions says only that the optimizer moves it; the numbers that matter are the throughput and memory.
"""
import argparse
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

import common
import data
import eval as evaluation
from lab.bench import write_sugarcrepe_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("degla", "cehn", "c2lip", "goal")


def write_coco(root, n_images, image_size, seed=0):
    """annotations/captions_train2014.json and train2014/COCO_train2014_<id>.jpg: shapes scenes, five captions each."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "train2014"))
    os.makedirs(os.path.join(root, "annotations"))
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        scene = data.sample_scene(rng)
        name = f"COCO_train2014_{image_id:012d}.jpg"
        data.render_scene(scene, image_size).save(os.path.join(root, "train2014", name))
        images.append({"id": image_id, "file_name": name, "height": image_size, "width": image_size})
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "caption": data.scene_caption(scene, rng)}
                        for _ in range(5)]
    with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, f)


def write_docci(root, n_images, image_size, seed=0):
    """docci_descriptions.jsonlines, images/, and sam_boxes.json (each object's box, as GOAL's SAM step gives)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "images"))
    lines, boxes = [], {}
    for k in range(n_images):
        scene = data.sample_scene(rng, n_objects=rng.choice([2, 3, 4]))
        text, _ = data.long_caption(scene, image_size, rng)
        image_file = f"train_{k:05d}.jpg"
        data.render_scene(scene, image_size).save(os.path.join(root, "images", image_file))
        boxes[f"images/{image_file}"] = [o.box(image_size) for o in scene]   # each object's box, in pixels
        lines.append({"example_id": f"train_{k:05d}", "split": "train", "image_file": image_file, "description": text})
    with open(os.path.join(root, "docci_descriptions.jsonlines"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    with open(os.path.join(root, "sam_boxes.json"), "w") as f:
        json.dump(boxes, f)


def run_script(method, flags, out, env, in_process=False):
    """`python <method>.py FLAGS --out OUT` as a subprocess (each method's peak GPU memory is then its own); its
    log.jsonl records. in_process (the dry run): `<method>.main(FLAGS)` in this process, the same code without an
    interpreter start per method."""
    if in_process:
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            importlib.import_module(method).main([*flags, "--out", out])
        finally:
            os.environ.clear()
            os.environ.update(saved)
    else:
        command = [sys.executable, os.path.join(REPO, f"{method}.py"), *flags, "--out", out]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"gpu_check: {method} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def plain_clip_step_ms(model_name, batch, device, precision, steps):
    """ms per optimizer step of plain open_clip CLIP fine-tuning (ClipLoss on random images and tokens)."""
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    tokenizer = common.tokenizer_for(model_name)
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    texts = tokenizer(["a photo of a red circle to the left of a blue square"] * batch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    loss_fn = open_clip.ClipLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(
        device.type, enabled=False)
    timings = []
    for step in range(steps + 2):   # the first two steps warm up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            image_emb, text_emb, scale = model(images, texts)[:3]
        loss = loss_fn(image_emb.float(), text_emb.float(), scale.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - t0)
    return 1000 * sorted(timings)[len(timings) // 2]


def summarize(method, records, batch, plain_ms):
    """One row: samples/s (median of the logged rates), ms per step and its ratio to plain, memory, loss trend.
    batch: samples per step on this GPU (--batch-size x --accum-freq); plain_ms: a plain step on that many."""
    rates = sorted(r["samples_per_s"] for r in records if "samples_per_s" in r)
    losses = [r["loss"] for r in records if "loss" in r]
    quarter = max(1, len(losses) // 4)
    finite = all(l == l and abs(l) != float("inf") for l in losses)
    falling = sum(losses[-quarter:]) / quarter < sum(losses[:quarter]) / quarter
    rate = rates[len(rates) // 2] if rates else float("nan")
    step_ms = 1000 * batch / rate if rates else float("nan")
    memory = max((r.get("gpu_memory_gb", 0.0) for r in records), default=0.0)
    return (f"| {method} | {batch} | {rate:.0f} | {step_ms:.0f} | {step_ms / plain_ms:.2f}x | {memory:.1f} | "
            f"{'yes' if finite else 'NO'} | {'yes' if falling else 'no'} |")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps of 4: checks the path, not speed")
    p.add_argument("--steps", type=int, default=40, help="training steps per method")
    p.add_argument("--images", type=int, default=2000, help="synthetic COCO images (five captions each)")
    p.add_argument("--long-images", type=int, default=400, help="synthetic DOCCI images for GOAL")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--work-dir", default=None, help="folder for the synthetic data and runs (default: a temp folder)")
    args = p.parse_args(argv)
    common.register_tiny_model()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if [m for m in methods if m not in METHODS]:
        p.error(f"--methods: expected a subset of {', '.join(METHODS)}")
    if args.dry_run:
        device, precision, steps, image_size, n_images, n_long = torch.device("cpu"), "fp32", 2, 64, 16, 8
        model_flags = ["--model", common.TINY_MODEL, "--pretrained", "none", "--batch-size", "4", "--workers", "0"]
        goal_flags = ["--context-length", "104", "--keep-positions", "8", "--batch-size", "2", "--workers", "0"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to check the path on the CPU")
        device, precision, steps, image_size = torch.device("cuda"), "bf16", args.steps, 224
        n_images, n_long = args.images, args.long_images
        model_flags = ["--model", "ViT-B-32-quickgelu", "--pretrained", "none"]
        goal_flags = []
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check-")
    env = dict(os.environ, COMPCLIP_CACHE=os.path.join(work, "cache"))
    coco, docci = os.path.join(work, "coco"), os.path.join(work, "docci")
    write_coco(coco, n_images, image_size)
    write_docci(docci, n_long, image_size)
    common_flags = ["--steps", str(steps), "--warmup", "1", "--eval", "", "--log-every", "1", "--save-every", "0",
                    "--no-progress", "--precision", precision]
    model_name = model_flags[1]
    rows = ["| method | samples per step per GPU | samples/s | ms per step | vs plain CLIP step | peak GPU memory (GB) | "
            "loss finite | loss fell |", "|---|---:|---:|---:|---:|---:|---|---|"]
    # every method at its paper's batch, then DeGLA once more with two micro-batches per step (--accum-freq 2)
    runs = [(method, method, []) for method in methods]
    if "degla" in methods:
        runs.append(("degla, --accum-freq 2", "degla", ["--accum-freq", "2"]))
    for label, method, extra_flags in runs:
        t0 = time.time()
        if method == "goal":
            lism = os.path.join(docci, "lism.json")
            if not os.path.exists(lism):
                subprocess.run([sys.executable, os.path.join(REPO, "goal.py"), "lism", "--data", "docci", "--data-root",
                                docci, "--segments-file", os.path.join(docci, "sam_boxes.json"), "--out", lism,
                                *model_flags[:4], *goal_flags[:4], "--scorer-model", "same", "--scorer-pretrained",
                                "same"], cwd=REPO, env=env, check=True, capture_output=True)
            flags = ["--data", "docci", "--data-root", docci, "--lism", lism, *model_flags, *goal_flags]
        else:
            flags = ["--data", "coco", "--data-root", coco, *model_flags]
        out = os.path.join(work, "runs", method + ("-accum" if extra_flags else ""))
        records = run_script(method, [*flags, *common_flags, *extra_flags], out, env, in_process=args.dry_run)
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        micro_batch, accum_freq = config["batch_size"], config["accum_freq"]
        # the plain step it is compared with sees the same samples: accum_freq plain steps of the micro-batch
        plain_ms = accum_freq * plain_clip_step_ms(model_name, micro_batch, device, precision,
                                                   steps=3 if args.dry_run else 10)
        rows.append(summarize(label, records, micro_batch * accum_freq, plain_ms))
        print(f"[gpu_check] {label}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    # the evaluation harness on a SugarCrepe-format fixture, with the same model architecture
    bench = os.path.join(work, "bench")
    os.makedirs(bench, exist_ok=True)
    n_items = write_sugarcrepe_fixture(Path(bench), n_items=70 if args.dry_run else 7000,
                                       n_images=20 if args.dry_run else 1000)
    model, _, transform, tokenizer = common.create_backbone(model_name, None, device=device)
    if precision == "bf16":   # the harness scores in the model's dtype: bf16 weights here, as on a GPU run's card
        model = model.to(torch.bfloat16)
    t0 = time.time()
    result = evaluation.evaluate(model.eval(), tokenizer, transform, ["sugarcrepe"], root=bench, device=device,
                                 workers=0 if args.dry_run else 8)
    seconds = time.time() - t0
    print("\n".join(rows))
    print(f"\nevaluation harness, SugarCrepe format: {n_items} items in {seconds:.1f} s "
          f"({n_items / seconds:.0f} items/s), {result['sugarcrepe']['n']} scored on {device.type}")
    return rows


if __name__ == "__main__":
    main()
