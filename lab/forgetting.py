"""Forgetting on the shapes world: zero-shot on colours and shapes that fine-tuning never showed.

    python -m lab.forgetting --out lab/results/forgetting      # 3 seeds of plain, NegCLIP, DeGLA, CE-CLIP; scores
    python -m lab.forgetting --seeds 0 --steps 200             # a quicker look

DeGLA's second claim is that its self-distillation keeps the pre-trained model's general knowledge while hard
negatives teach composition (DeGLA, Hu et al. 2025, Table 5: zero-shot on 11 data sets, DeGLA 58.7 against NegCLIP
58.1, CE-CLIP 45.7 and CLIP 61.0). On the shapes world the suite's zero-shot sits at 99-100% for every fine-tuned model, because
fine-tuning shows every colour and shape the classifier asks about. Here the fine-tuning scenes never show the
held-out words (`--shapes-holdout`, data.ShapesDataset(holdout=...)), while the base model, trained on every word,
names them almost perfectly; what a fine-tuned model loses on them is what fine-tuning made it forget. The words
never appear in a training image or caption, but the rule-made replacement negatives may name them (DeGLA's
replace_adjs, CE-CLIP's attribute and object), as a real data set's negatives can name classes it never shows.

Scores (%, zero-shot with the suite's templates, on single-object test scenes; "held out" are the objects that show a
held-out colour or shape, "seen" the others):
  colour held out   8-way colour of the objects whose colour is held out
  shape held out    8-way shape of the objects whose shape is held out
  pair held out     64-way colour-and-shape of the objects that show a held-out word
  pair seen         64-way colour-and-shape of the other objects (the control: what fine-tuning saw)
The runs are lab.compare's settings (plain, negclip, degla, cehn: the same scripts and flags) trained with
`--shapes-holdout` and without the suite's evaluation (`--eval=`: the comparison measures composition), each an
ordinary subprocess; finished runs are reused, interrupted ones resume. Each run's scores go to forgetting.json in
its folder (kept with the run's record, so the model is not needed again), and the table with each method's paired
difference to its baselines to forgetting.md.
"""
import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch

import data
import eval as evaluation
from lab import compare

FORGETTING_SEED = evaluation.SHAPES_SUITE_SEED + 7   # a test stream of its own, apart from the suite's scenes
FORGETTING_SCENES = 2400   # single-object scenes: about 300 per held-out word
FORGETTING_HOLDOUT = "purple,cyan,star,heart"   # two colours and two shapes: 44% of the test objects show one
FORGETTING_STEPS = 400   # a shorter budget than the comparison's 1000 steps, for the cost of 12 runs
SCORES = ("colour held out", "shape held out", "pair held out", "pair seen")
# (method, baseline) rows of the paired table: DeGLA's Table 5 compares with NegCLIP, CE-CLIP (its headline "+13.0%")
# and CLIP (plain fine-tuning here)
PAIRS = (("degla", "negclip"), ("degla", "cehn"), ("degla", "plain"), ("negclip", "plain"), ("cehn", "plain"))


@torch.no_grad()
def forgetting_scores(model, tokenizer, transform, holdout, device=None, n_scenes=FORGETTING_SCENES):
    """The four scores above for one model; `holdout` a list of colours and shapes."""
    held_colours = [c for c in data.COLORS if c in holdout]
    held_shapes = [s for s in data.SHAPES if s in holdout]
    singles = data.ShapesDataset("test", size=n_scenes, seed=FORGETTING_SEED, n_objects=1)
    objects = [scene[0] for scene in singles.scenes]
    model.eval()
    image_emb, _ = evaluation.encode_images(model, [singles.image(i) for i in range(n_scenes)], transform, device,
                                            workers=0)
    templates = [t + "." for t in evaluation.ZEROSHOT_TEMPLATES]

    def accuracy(classnames, label_of, keep):
        rows = [i for i, o in enumerate(objects) if keep(o)]
        if not rows:
            return None
        classifier = evaluation.zero_shot_classifier(model, tokenizer, classnames, templates, device)
        labels = torch.tensor([classnames.index(label_of(objects[i])) for i in rows])
        return evaluation.zero_shot_scores(image_emb[rows], labels, classifier)["acc1"]

    pairs = [f"{c} {s}" for c in data.COLORS for s in data.SHAPES]
    pair_of = lambda o: f"{o.color} {o.shape}"  # noqa: E731
    held = lambda o: o.color in holdout or o.shape in holdout  # noqa: E731
    return {
        "colour held out": accuracy([f"{c} object" for c in data.COLORS], lambda o: f"{o.color} object",
                                    lambda o: o.color in held_colours),
        "shape held out": accuracy(list(data.SHAPES), lambda o: o.shape, lambda o: o.shape in held_shapes),
        "pair held out": accuracy(pairs, pair_of, held),
        "pair seen": accuracy(pairs, pair_of, lambda o: not held(o)),
        "n held out": sum(map(held, objects)), "n seen": sum(not held(o) for o in objects),
    }


def score_run(run_dir, device=None, base_cache=None):
    """forgetting.json of a finished run folder: the base's and the run's scores (computed once, then read).
    base_cache: a dict shared over runs, so that a base model is scored once per (model, weights, holdout)."""
    run_dir = Path(run_dir)
    path = run_dir / "forgetting.json"
    if path.exists():
        return json.loads(path.read_text())
    config = json.loads((run_dir / "config.json").read_text())
    holdout = list(data._words(config.get("shapes_holdout")))
    if not holdout:
        raise SystemExit(f"lab.forgetting: {run_dir} was trained without --shapes-holdout: nothing was held out")
    if not (run_dir / "open_clip_config.json").exists():
        raise SystemExit(f"lab.forgetting: {run_dir} has no exported model (a finished run writes one)")
    device = evaluation.pick_device(device)

    def scores_of(name, pretrained):
        model, transform, tokenizer = evaluation.create_backbone(name, pretrained, device)
        return forgetting_scores(model, tokenizer, transform, holdout, device)

    base = (config["model"], config.get("pretrained") or "shapes")
    base_cache = {} if base_cache is None else base_cache
    if (*base, tuple(holdout)) not in base_cache:
        base_cache[(*base, tuple(holdout))] = scores_of(*base)
    scores = {"holdout": holdout, "before": base_cache[(*base, tuple(holdout))],
              "after": scores_of(f"local-dir:{run_dir}", None)}
    evaluation._atomic_write(path, json.dumps(scores, indent=1))
    return scores


def forgetting_table(runs):
    """Markdown: each setting's scores before and after (mean +- std over seeds), then the paired differences."""
    scores = {m: {json.loads((Path(d) / "config.json").read_text()).get("seed", i): score_run(d)
                  for i, d in enumerate(dirs)} for m, dirs in runs.items() if dirs}
    first = next(iter(next(iter(scores.values())).values()))
    lines = [f"Held out of fine-tuning: {', '.join(first['holdout'])} ({first['before']['n held out']} test objects "
             f"show one, {first['before']['n seen']} do not).", "",
             "| score | base | " + " | ".join(scores) + " |", "|---|---:|" + "---:|" * len(scores)]
    for key in SCORES:
        base = first["before"][key]
        cells = [compare._pm(*compare._mean_std([s["after"][key] for s in per_seed.values()]))
                 for per_seed in scores.values()]
        lines.append(f"| {key} | {evaluation._fmt(base)} | " + " | ".join(cells) + " |")
    lines += ["", "| method | baseline | score | baseline after | method after | method - baseline (paired) | beats? |",
              "|---|---|---|---:|---:|---:|---|"]
    for method, baseline in PAIRS:
        if method not in scores or baseline not in scores:
            continue
        for key in SCORES[:3]:
            mine = {seed: s["after"][key] for seed, s in scores[method].items()}
            theirs = {seed: s["after"][key] for seed, s in scores[baseline].items() if seed in mine}
            mine = {seed: v for seed, v in mine.items() if seed in theirs}
            paired = [mine[seed] - theirs[seed] for seed in mine]
            stat = lambda values: compare._pm(*compare._mean_std(list(values)))  # noqa: E731
            lines.append(f"| {method} | {baseline} | {key} | {stat(theirs.values())} | {stat(mine.values())} | "
                         f"{stat(paired)} | {compare.beats(mine, theirs)} |")
    return "\n".join(lines)


def forgetting_main(argv):
    p = argparse.ArgumentParser(prog="python -m lab.forgetting", description="Zero-shot on held-out colours and "
                                "shapes of runs trained with --shapes-holdout (see the module docstring).")
    p.add_argument("--out", default="runs/forgetting", help="folder of the runs (<method>-seed<n>); forgetting.md "
                   "is written there")
    p.add_argument("--methods", default="plain,negclip,degla,cehn", help="comma-separated lab.compare settings")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=FORGETTING_STEPS, help="training steps of every run")
    p.add_argument("--holdout", default=FORGETTING_HOLDOUT, help="colours and shapes no training scene shows")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    compare._add_parallel_flags(p)
    p.add_argument("--no-train", action="store_true", help="train nothing: score and tabulate the finished runs")
    args = p.parse_args(argv)
    methods = compare._parse_methods(args.methods, "forgetting")
    args.extra = f"--shapes-holdout {args.holdout} --eval="   # read by compare._train_missing
    finished = lambda d: (d / "forgetting.json").exists() or (d / "open_clip_config.json").exists()  # noqa: E731
    runs, jobs = OrderedDict((m, []) for m in methods), []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in methods:
            run_dir = Path(args.out) / f"{method}-seed{seed}"
            if finished(run_dir) or not args.no_train:
                runs[method].append(run_dir)
            if not finished(run_dir) and not args.no_train:
                jobs.append((method, seed, run_dir, args.steps))
    compare._train_missing(jobs, args)
    runs = OrderedDict((m, dirs) for m, dirs in runs.items() if dirs)
    if not runs:
        raise SystemExit(f"lab.forgetting: no finished runs of {args.methods} in {args.out}")
    base_cache = {}   # every run starts from the same base: score it once
    for dirs in runs.values():
        for d in dirs:
            score_run(d, args.device, base_cache)
    table = forgetting_table(runs)
    evaluation._atomic_write(Path(args.out) / "forgetting.md", table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    forgetting_main(sys.argv[1:])
