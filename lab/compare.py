"""Side-by-side comparison of plain fine-tuning and the four methods on the shapes world.

    python -m lab.compare --out lab/results/compare --readme docs/results.md     # 3 seeds x 8 settings, 1000 steps
    python -m lab.compare --methods plain,degla --seeds 0 --steps 250           # a quicker look
    python -m lab.compare --runs runs/degla-a runs/plain-a                      # tabulate finished runs (any data)

Each run is an ordinary `python <method>.py ...` subprocess writing its own run folder; finished runs are reused
and interrupted ones resume, so an interrupted comparison continues where it stopped.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

import common
import eval as evaluation
from lab.figures import GREEN, GREY, INK, RED, _font, _nice_step, _save

# ===== Side by side: `python -m lab.compare` =====
# Runs plain fine-tuning and the four methods on the shapes world with the same base model, steps, batch size
# and seeds (each run is an ordinary `python <method>.py ...` subprocess writing its own run folder), or reads
# finished runs (`--runs`), and writes one markdown table: every metric before and after, mean and spread over
# seeds, wall time and samples/s per method. Finished runs are reused, so an interrupted comparison continues.

# name -> (script, extra flags). Each claim is measured against the baseline its paper uses:
# - "plain": CLIP fine-tuning on the same short captions with every extra weight at 0 (DeGLA, CE-CLIP);
# - "negclip": hard negatives in the global loss only (DeGLA and CE-CLIP also compare against it);
# - "plain-siglip": SigLIP fine-tuning (sigmoid loss) of the SigLIP base, C2LIP's weights at 0 (C2LIP fine-tunes
#   SigLIP in its paper, so it runs on the shipped SigLIP twin);
# - "plain-long": GOAL's script with its two local losses at 0, on the same long captions and stretched context.
# "c2lip-clip" (C2LIP on the CLIP base, the adaptation readers ask about) is not in the default list: name it in
# --methods to run it.
COMPARE_TRAIN_SIZE = 20000   # scenes in the training split of every comparison run: 1000 steps of 64 see each ~3 times
COMPARE_STEPS = 1000   # the comparison budget: the steps at which NegCLIP's hard negatives beat plain fine-tuning on
                       # ARO by more than 5 points on the shipped base (250 and 500 were not enough: docs/testbed.md)
SIGLIP_FLAGS = ["--model", common.SHAPES_SIGLIP_MODEL]
CEHN_SPATIAL_TYPES = "relation,attribute,object,spatial"
COMPARE_METHODS = OrderedDict([
    ("plain", ("degla.py", ["--baseline", "plain"])),
    ("negclip", ("degla.py", ["--baseline", "negclip"])),
    ("degla", ("degla.py", [])),
    ("cehn", ("cehn.py", [])),
    ("plain-siglip", ("c2lip.py", [*SIGLIP_FLAGS, "--w-npc", "0", "--w-xac", "0"])),
    ("c2lip", ("c2lip.py", SIGLIP_FLAGS)),
    ("plain-long", ("goal.py", ["--local-weight", "0", "--tsl-weight", "0"])),
    ("goal", ("goal.py", [])),
    ("c2lip-clip", ("c2lip.py", ["--model", common.TINY_MODEL])),
    ("cehn-itchn", ("cehn.py", ["--w-cmr", "0", "--w-imc", "0"])),
    ("cehn-spatial", ("cehn.py", ["--neg-types", CEHN_SPATIAL_TYPES])),
    ("cehn-itchn-spatial", ("cehn.py", ["--neg-types", CEHN_SPATIAL_TYPES, "--w-cmr", "0", "--w-imc", "0"])),
])
# Not in the default list: "c2lip-clip"; "cehn-itchn", CE-CLIP's own same-data baseline (its paper's Table 4
# "itc(hn)": the hard-negative ITC alone, CE-CLIP's two extra losses at 0; the same loss, data and optimiser as NegCLIP
# with CE-CLIP's four types, `degla.py --baseline negclip --neg-types relation,attribute,object,action`, which
# tests/test_end_to_end.py checks step by step); and the "-spatial" pair, whose fourth slot flips the spatial relation
# of the verb-less shapes captions instead of being invalid (an ablation: that edit is SugarCrepe's replace_rel).
COMPARE_OPTIONAL = ("c2lip-clip", "cehn-itchn", "cehn-spatial", "cehn-itchn-spatial")
COMPARE_DEFAULT_METHODS = [m for m in COMPARE_METHODS if m not in COMPARE_OPTIONAL]
COMPARE_BEGIN, COMPARE_END = "<!-- compare:begin -->", "<!-- compare:end -->"


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return mean, std   # std None for a single run: one seed has no spread, and "± 0.0" would claim one


def _pm(mean, std, digits=1):
    """'mean ± std', or just 'mean' when there is one run (no spread to show)."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _run_stats(run_dir):
    """(results.json payload, config, wall seconds, samples/s) of a finished run folder."""
    run_dir = Path(run_dir)
    payload = json.loads((run_dir / "results.json").read_text())
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    extra = payload.get("extra") or {}
    wall = extra.get("wall_seconds")
    if wall is None and (run_dir / "compare_time.json").exists():   # written by `compare` around the run
        wall = json.loads((run_dir / "compare_time.json").read_text())["wall_seconds"]
    throughput = extra.get("samples_per_s")
    if throughput is None and (run_dir / "log.jsonl").exists():      # mean of the logged training throughput
        logged = [json.loads(line).get("samples_per_s") for line in (run_dir / "log.jsonl").read_text().splitlines()
                  if line.strip()]
        logged = [v for v in logged if v is not None]
        throughput = sum(logged) / len(logged) if logged else None
    return payload, config, wall, throughput


# Each method's target metric on the shapes suite (the subsets its paper's claim is about) and the baselines its
# paper measures it against.
def _mean_of(*keys):
    return lambda m: sum(m[k] for k in keys) / len(keys)


ARO = ("ARO: mean of relation order and attribute binding", _mean_of("aro_relation", "aro_attribute"))
SWAP = ("SWAP: mean of swap_obj and swap_att", _mean_of("swap_obj", "swap_att"))
DEGLA_TARGET = ("mean of replace and swap subsets",
                _mean_of("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att"))
C2LIP_TARGET = ("mean of swap_att, replace_att, ADD",
                lambda m: (m["swap_att"] + m["replace_att"] + (m["add_obj"] + m["add_att"]) / 2) / 3)
GOAL_TARGET = ("long-caption R@1, mean of both directions", _mean_of("long_i2t_r1", "long_t2i_r1"))
TARGET_SHORT = {ARO[0]: "ARO", SWAP[0]: "SWAP", DEGLA_TARGET[0]: "replace + swap",
                C2LIP_TARGET[0]: "swap_att, replace_att, ADD", GOAL_TARGET[0]: "long-caption R@1"}   # the figure's labels
# (method, baseline, (target label, metric)): one row each in the targets table. NegCLIP's two rows are the
# testbed's own check: hard negatives must lift ARO and SWAP over plain fine-tuning, as they do on COCO
# (docs/testbed.md).
COMPARE_TARGETS = [
    ("negclip", "plain", ARO), ("negclip", "plain", SWAP),
    ("degla", "plain", DEGLA_TARGET), ("degla", "negclip", DEGLA_TARGET),
    ("cehn", "plain", ARO), ("cehn", "negclip", ARO), ("cehn", "plain", SWAP), ("cehn", "negclip", SWAP),
    ("cehn", "cehn-itchn", ARO), ("cehn", "cehn-itchn", SWAP),
    ("cehn-spatial", "plain", ARO), ("cehn-spatial", "negclip", ARO), ("cehn-spatial", "plain", SWAP),
    ("cehn-spatial", "negclip", SWAP), ("cehn-spatial", "cehn-itchn-spatial", ARO),
    ("cehn-spatial", "cehn-itchn-spatial", SWAP),
    ("c2lip", "plain-siglip", C2LIP_TARGET),
    ("c2lip-clip", "plain", C2LIP_TARGET),
    ("goal", "plain-long", GOAL_TARGET),
]
ZEROSHOT_KEYS = ("zeroshot_shape", "zeroshot_color", "zeroshot_color_shape")
RETRIEVAL_KEYS = ("retrieval_i2t_r1", "retrieval_t2i_r1")


def _seeded_values(dirs, metric_fn, when="after"):
    """{seed: metric} of run folders (the seed from config.json, else the folder's position)."""
    out = {}
    for i, d in enumerate(dirs):
        payload = json.loads((Path(d) / "results.json").read_text())
        config_path = Path(d) / "config.json"
        seed = json.loads(config_path.read_text()).get("seed", i) if config_path.exists() else i
        result = (payload.get(when) or {}).get("shapes")
        try:
            out[seed] = metric_fn(result["metrics"])
        except (KeyError, TypeError):   # no shapes result, or not every subset of the target in it
            pass
    return out


def beats(mine, baseline):
    """The comparison's rule: a method beats its baseline when the mean of the seed-paired differences is larger than
    the seed spread (max - min) of either run set, and every paired difference is positive. Returns 'yes',
    'no (worse)' (the same rule the other way), 'no (within spread)', or '1 seed' (no spread to compare with)."""
    seeds = sorted(set(mine) & set(baseline))
    if len(seeds) < 2:
        return "1 seed" if seeds else "–"
    paired = [mine[s] - baseline[s] for s in seeds]
    spread = max(max(v[s] for s in seeds) - min(v[s] for s in seeds) for v in (mine, baseline))
    mean = sum(paired) / len(paired)
    if mean > spread and min(paired) > 0:
        return "yes"
    if -mean > spread and max(paired) < 0:
        return "no (worse)"
    return "no (within spread)"


def target_rows(runs):
    """One dict per COMPARE_TARGETS row whose method and baseline both have runs with the shapes suite: method,
    baseline, label, metric_fn, and {seed: value} for the method, the baseline and their paired difference (over the
    seeds both have), with the verdict of `beats`."""
    rows = []
    for method, baseline, (label, metric_fn) in COMPARE_TARGETS:
        if not runs.get(method) or not runs.get(baseline):
            continue
        mine, theirs = _seeded_values(runs[method], metric_fn), _seeded_values(runs[baseline], metric_fn)
        common_seeds = set(mine) & set(theirs)   # every column over the same seeds, so that they pair
        mine = {s: v for s, v in mine.items() if s in common_seeds}
        theirs = {s: v for s, v in theirs.items() if s in common_seeds}
        if not mine:   # runs without the shapes suite (real data), or no seed in common: no target to show
            continue
        rows.append(dict(method=method, baseline=baseline, label=label, metric_fn=metric_fn, mine=mine,
                         theirs=theirs, paired={s: mine[s] - theirs[s] for s in mine}, verdict=beats(mine, theirs)))
    return rows


def compare_targets_table(runs):
    """Each method's target against each baseline of its paper (shapes suite, %), with zero-shot and retrieval."""
    stat = lambda values: _pm(*_mean_std(list(values.values())))  # noqa: E731
    lines = ["| method | target | baseline | base | baseline after | method after | method - baseline (paired) "
             "| beats? | zero-shot base / baseline / method | R@1 baseline / method |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    zero_shot, retrieval = _mean_of(*ZEROSHOT_KEYS), _mean_of(*RETRIEVAL_KEYS)
    for row in target_rows(runs):
        method, baseline, seeds = row["method"], row["baseline"], set(row["mine"])
        same_seeds = lambda values: {k: v for k, v in values.items() if k in seeds}  # noqa: E731
        base = _mean_std(list(_seeded_values(runs[method], row["metric_fn"], "before").values()))[0]
        zs_base = _mean_std(list(_seeded_values(runs[method], zero_shot, "before").values()))[0]
        zs = [stat(same_seeds(_seeded_values(runs[m], zero_shot))) for m in (baseline, method)]
        r1 = [stat(same_seeds(_seeded_values(runs[m], retrieval))) for m in (baseline, method)]
        lines.append(f"| {method} | {row['label']} | {baseline} | {evaluation._fmt(base)} | {stat(row['theirs'])} | "
                     f"{stat(row['mine'])} | {stat(row['paired'])} | {row['verdict']} | "
                     f"{evaluation._fmt(zs_base)} / {zs[0]} / {zs[1]} | {r1[0]} / {r1[1]} |")
    return "\n".join(lines)


def verdict_figure(rows, path):
    """One picture of the verdicts: per target row, the method's paired difference to its baseline (points of the
    shapes suite), one dot per seed, the mean as a bar with a +-1 std whisker, coloured by the `beats` rule (green:
    beats, red: worse, grey: within the seed spread). PIL only, like lab/figures.py."""
    font, small = _font(14), _font(12)
    label_w, plot_w, text_w, row_h, top = 330, 520, 270, 30, 78
    width, height = label_w + plot_w + text_w + 20, top + row_h * len(rows) + 70
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    values = [v for row in rows for v in row["paired"].values()] or [1.0]
    step = _nice_step(max(abs(v) for v in values), ticks=3)
    span = step * max(1, math.ceil(max(abs(v) for v in values) / step + 1e-9))
    x0, x1 = label_w, label_w + plot_w
    x_of = lambda value: x0 + (value + span) / (2 * span) * plot_w  # noqa: E731
    draw.text((10, 10), "Each method against its paper's baseline on the shapes world: paired difference of the "
              "target metric (points)", fill=INK, font=font)
    draw.text((10, 32), "dots: seeds; bar: mean; whisker: +-1 std. Green: beats (mean above both seed spreads, every "
              "seed positive); red: worse by the same rule; grey: within the spread.", fill=GREY, font=small)
    bottom = top + row_h * len(rows)
    for k in range(-round(span / step), round(span / step) + 1):
        x = x_of(k * step)
        draw.line([(x, top - 6), (x, bottom)], fill=INK if k == 0 else (225, 225, 225), width=1)
        tick = f"{k * step:+g}" if k else "0"
        draw.text((x - draw.textlength(tick, font=small) / 2, bottom + 6), tick, fill=INK, font=small)
    draw.text(((x0 + x1) / 2 - 120, bottom + 26), "method - baseline (points, paired by seed)", fill=INK, font=small)
    for i, row in enumerate(rows):
        y = top + row_h * i + row_h / 2
        colour = GREEN if row["verdict"] == "yes" else RED if row["verdict"] == "no (worse)" else GREY
        draw.text((10, y - 8), f"{row['method']} vs {row['baseline']}: {TARGET_SHORT[row['label']]}", fill=INK,
                  font=small)
        mean, std = _mean_std(list(row["paired"].values()))
        draw.rectangle([min(x_of(0), x_of(mean)), y - 7, max(x_of(0), x_of(mean)), y + 7], fill=colour)
        if std is not None:
            draw.line([(x_of(mean - std), y), (x_of(mean + std), y)], fill=INK, width=2)
            for end in (mean - std, mean + std):
                draw.line([(x_of(end), y - 5), (x_of(end), y + 5)], fill=INK, width=2)
        for value in row["paired"].values():
            draw.ellipse([x_of(value) - 3, y - 3, x_of(value) + 3, y + 3], outline=INK, fill="white")
        draw.text((x1 + 12, y - 8), f"{_pm(mean, std)}  {row['verdict']} ({len(row['paired'])} seeds)",
                  fill=colour, font=small)
    _save(canvas, path)
    return path


def _run_clock(runs):
    """Wall-clock time during which at least one run was going (the union of the runs' intervals, so that pauses
    between two `compare` invocations do not count) and the summed run time, from compare_time.json."""
    intervals, total = [], 0.0
    for dirs in runs.values():
        for d in dirs:
            path = Path(d) / "compare_time.json"
            if path.exists():
                record = json.loads(path.read_text())
                seconds, end = record["wall_seconds"], record.get("ended_at", path.stat().st_mtime)
                intervals.append((end - seconds, end))
                total += seconds
    busy, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return (busy if intervals else None), total


def _starting_point(config):
    """What a run's 'before' column is: its model name and, if it changed it (GOAL), its text context."""
    model = config.get("model") or "?"
    return f"{model}, context {config['context_length']}" if config.get("context_length") else model


def compare_table(runs, summary_only=False):
    """Markdown tables from {method: [run_dir, ...]} (one run per seed): one table per starting point (model and
    context length), so that each 'before' column is the model its runs started from; methods keep their order.
    summary_only keeps the bold summary rows (REPLACE, SWAP, ...) and drops the per-subset ones."""
    stats = {m: [_run_stats(d) for d in dirs] for m, dirs in runs.items() if dirs}
    if not stats:
        raise SystemExit("lab.compare: no finished runs (no results.json) to tabulate")
    groups = OrderedDict()
    for m, method_stats in stats.items():
        groups.setdefault(_starting_point(method_stats[0][1]), []).append(m)
    lines = []
    for start, methods in groups.items():
        if len(groups) > 1:
            lines += [f"Starting from **{start}**:", ""]
        first = stats[methods[0]][0][0]
        lines += ["| benchmark | metric | before | " + " | ".join(methods) + " |",
                  "|---|---|---:|" + "---:|" * len(methods)]
        for bench, result in first["before"].items():
            keys = [(k, True) for k in result.get("summary", {})]
            if not summary_only:
                keys += [(k, False) for k in result.get("metrics", {}) if k not in result.get("summary", {})]
            for key, is_summary in keys:
                field = "summary" if is_summary else "metrics"
                before, _ = _mean_std([p["before"][bench][field].get(key) for m in methods for p, *_ in stats[m]
                                       if bench in p["before"]])
                cells = [_pm(*_mean_std([(p["after"] or {}).get(bench, {}).get(field, {}).get(key)
                                         for p, *_ in stats[m]])) for m in methods]
                label = f"**{key}**" if is_summary else key
                lines.append(f"| {bench} | {label} | {evaluation._fmt(before)} | " + " | ".join(cells) + " |")
        for label, index in (("wall time per run (s)", 2), ("training samples/s", 3)):
            cells = [_pm(*_mean_std([s[index] for s in stats[m]]), digits=0) for m in methods]
            lines.append(f"| run | {label} | | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = {m: len(v) for m, v in stats.items()}
    lines.append(f"Cells: mean ± standard deviation over seeds (runs per method: "
                 f"{', '.join(f'{m} {n}' for m, n in seeds.items())}); 'before' is the starting model.")
    return "\n".join(lines)


def _replace_readme_section(readme, table, command, runs):
    text = Path(readme).read_text()
    if COMPARE_BEGIN not in text or COMPARE_END not in text:
        raise SystemExit(f"lab.compare: {readme} has no {COMPARE_BEGIN} ... {COMPARE_END} section to fill")
    span, total = _run_clock(runs)
    clock = (f"the runs took {span / 60:.0f} minutes of wall-clock time ({total / 60:.0f} minutes of run time, "
             f"run side by side)" if span else "from finished run folders")
    body = (f"{COMPARE_BEGIN}\nGenerated by `{command}` on {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU "
            f"cores: {clock}. Regenerate it with the same command without --no-train (finished runs in the output "
            f"folder are reused, missing ones are trained; delete the folder to start over).\n\n{table}\n{COMPARE_END}")
    start, end = text.index(COMPARE_BEGIN), text.index(COMPARE_END) + len(COMPARE_END)
    evaluation._atomic_write(readme, text[:start] + body + text[end:])


def _compare_run(method, seed, run_dir, steps, args, here, env):
    """Train and evaluate one (method, seed) as an ordinary subprocess (`steps` None: the script's default) on
    args.train_size scenes; returns an error string or None."""
    script, flags = COMPARE_METHODS[method]
    command = [sys.executable, str(here / script), "--seed", str(seed), "--out", str(run_dir), "--no-progress",
               "--train-size", str(args.train_size), *flags, *args.extra.split()]
    if steps:
        command += ["--steps", str(steps)]
    if (run_dir / "checkpoint.pt").exists():
        command += ["--resume", str(run_dir)]
    print(f"[compare] {method} seed {seed}: {' '.join(command[1:])}", flush=True)
    t0 = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "stdout.txt", "a") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return f"{method} seed {seed} failed (exit {done.returncode}, see {run_dir / 'stdout.txt'})"
    # the end time is written down, not read from the file's mtime: run records are committed, and a clone's files
    # all carry the checkout's time
    ended = time.time()
    evaluation._atomic_write(run_dir / "compare_time.json", json.dumps({"wall_seconds": ended - t0, "ended_at": ended}))
    print(f"[compare] {method} seed {seed}: done in {ended - t0:.0f} s", flush=True)
    return None


def compare_name(config):
    """The COMPARE_METHODS name of a run from its config.json: the script alone does not tell, since the baselines
    are the methods' own scripts with flags (plain and NegCLIP are degla.py, plain SigLIP is c2lip.py, ...)."""
    method = config.get("method", "?")
    off = lambda *keys: all(config.get(k) in (0, 0.0) for k in keys)  # noqa: E731
    if method == "degla" and config.get("baseline") in ("plain", "negclip"):
        return config["baseline"]
    if method == "c2lip":
        siglip = "siglip" in str(config.get("model", ""))
        if off("w_npc", "w_xac"):
            return "plain-siglip" if siglip else "plain-c2lip-clip"
        return "c2lip" if siglip else "c2lip-clip"
    if method == "goal" and off("local_weight", "tsl_weight"):
        return "plain-long"
    if method == "cehn":
        spatial = "-spatial" if "spatial" in str(config.get("neg_types", "")) else ""
        if off("w_cmr", "w_imc") and config.get("itc_hn") not in (0, 0.0):
            return "cehn-itchn" + spatial
        return "cehn" + spatial
    return method


def _parse_methods(text, prog):
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise SystemExit(f"lab.{prog}: unknown method(s) {unknown}; known: {list(COMPARE_METHODS)}")
    return methods


def _add_parallel_flags(p):
    """--train-size, --jobs and --threads, which `_train_missing` reads (compare and budget)."""
    p.add_argument("--train-size", type=int, default=COMPARE_TRAIN_SIZE, help="shapes scenes in every run's training "
                   "split (the scripts' own demo default is smaller)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (CPU threads are split between them)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: the cores / --jobs; "
                   "set it when another run already uses some of the cores)")


def _train_missing(jobs, args):
    """Run the (method, seed, run_dir, steps) jobs, `args.jobs` at a time, each on its share of the CPU threads:
    on small models two one-thread processes get more done than one process using two threads."""
    here = Path(__file__).resolve().parent.parent   # the repository: the method scripts live there
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        failures = [f for f in pool.map(lambda job: _compare_run(*job, args, here, env), jobs) if f]
    if failures:
        raise SystemExit("lab: " + "; ".join(failures) + "; rerun the same command to continue "
                         "(finished runs are reused, interrupted ones resume from their checkpoint)")


def compare_main(argv):
    p = argparse.ArgumentParser(prog="lab.compare", description="Side-by-side table of plain fine-tuning and "
                                "the four methods (shapes world by default, or finished runs with --runs).")
    p.add_argument("--methods", default=",".join(COMPARE_DEFAULT_METHODS),
                   help=f"comma-separated subset of {list(COMPARE_METHODS)} (default: all but {', '.join(COMPARE_OPTIONAL)})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (the full comparison, 3 seeds x "
                   "8 settings at 1000 steps, took 507 minutes of run time and 323 minutes of wall-clock time with 2 "
                   "runs side by side on 2 CPU cores; --seeds 0 or --steps 250 for a quicker look)")
    p.add_argument("--steps", type=int, default=COMPARE_STEPS, help="training steps of every run (the comparison budget; "
                   "the scripts' own shapes default is the shorter demo budget)")
    p.add_argument("--out", default="runs/compare", help="folder of the runs and of compare.md")
    p.add_argument("--runs", nargs="+", default=None, help="tabulate these finished run folders instead of training "
                   "(e.g. real COCO/DOCCI runs); grouped by what their config.json says they are (plain, negclip, degla, "
                   "plain-siglip, ...)")
    p.add_argument("--readme", default=None, help="also write the table into this README's compare section")
    p.add_argument("--figure", default=None, help="also draw the verdicts (each target row's paired difference per "
                   "seed) into this PNG, e.g. docs/verdicts.png")
    p.add_argument("--extra", default="", help="extra flags passed to every run, e.g. '--train-size 5000'")
    _add_parallel_flags(p)
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: tabulate the finished runs among those requested (others are left out)")
    args = p.parse_args(argv)
    if args.runs:
        unfinished = [d for d in args.runs if not (Path(d) / "results.json").exists()]
        if unfinished:
            raise SystemExit(f"lab.compare: no results.json in {', '.join(unfinished)}: --runs takes finished run "
                             "folders (a run writes results.json when it ends)")
        runs = OrderedDict()
        for d in args.runs:
            config_path = Path(d) / "config.json"
            name = compare_name(json.loads(config_path.read_text())) if config_path.exists() else Path(d).name
            runs.setdefault(name, []).append(d)
    else:
        methods = _parse_methods(args.methods, "compare")
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = OrderedDict((m, []) for m in methods)
        jobs = []
        for seed in seeds:
            for m in methods:
                run_dir = Path(args.out) / f"{m}-seed{seed}"
                if (run_dir / "results.json").exists() or not args.no_train:
                    runs[m].append(run_dir)
                if not (run_dir / "results.json").exists() and not args.no_train:
                    jobs.append((m, seed, run_dir, args.steps))
        _train_missing(jobs, args)
    targets = compare_targets_table(runs)
    if args.figure:
        print(f"wrote {verdict_figure(target_rows(runs), args.figure)}")
    intro = ""
    if targets.count("\n") > 1:
        intro = ("**Each method's target metric against its paper's baselines** (shapes suite, %; mean ± standard "
                 "deviation over seeds; the difference pairs the runs of equal seed; 'beats?' asks for a mean "
                 "difference above both run sets' seed spread, max - min, and a positive difference in every "
                 "seed):\n\n" + targets + "\n\n**Every metric**:\n\n")
    table = intro + compare_table(runs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    evaluation._atomic_write(Path(args.out) / "compare.md", table + "\n")
    print(table)
    if args.readme:   # the README keeps the summary rows; compare.md in the output folder has every subset
        short = intro.replace("**Every metric**", "**Summary metrics** (every subset: compare.md in the output "
                              "folder)") + compare_table(runs, summary_only=True)
        _replace_readme_section(args.readme, short, "python -m lab.compare " + " ".join(argv), runs)
    return table




if __name__ == "__main__":
    compare_main(sys.argv[1:])
