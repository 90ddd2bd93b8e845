"""Budget curve: each method's target and its baselines' after several step counts, one seed.

    python -m lab.budget --out lab/results/budget          # 250, 500 and 1000 steps, seed 0

Runs live in <out>/steps-<N>/<method>-seed<seed>; finished `lab.compare` runs of the same step count and seed are
reused instead of trained again.
"""
import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import eval as evaluation
from lab.compare import (COMPARE_DEFAULT_METHODS, COMPARE_METHODS, COMPARE_OPTIONAL, COMPARE_STEPS, COMPARE_TARGETS,
                         _add_parallel_flags, _parse_methods, _seeded_values, _train_missing)

# ===== Budget curve: `python -m lab.budget` =====
# One seed of each method and its baselines at several step counts (by default a quarter, a half and all of the
# comparison's 1000 steps, lab.compare's COMPARE_STEPS), and one table of each target: does a method's gap over
# its baseline close, open or flip with more training? Runs live in <out>/steps-<N>/<method>-seed<seed>; finished
# `lab.compare` runs of the same step count and seed are reused instead of trained again.
def budget_table(runs_by_steps):
    """Markdown table from {steps: {method: [run_dir]}}: per target, the baseline's and the method's value and their
    difference at each step count (one seed, so no spread)."""
    budgets = sorted(runs_by_steps)
    lines = ["| method | target | baseline | " + " | ".join(f"{n} steps: baseline / method (diff)" for n in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for method, baseline, (label, metric_fn) in COMPARE_TARGETS:
        cells = []
        for n in budgets:
            runs = runs_by_steps[n]
            mine = _seeded_values(runs.get(method, []), metric_fn)
            theirs = _seeded_values(runs.get(baseline, []), metric_fn)
            seeds = sorted(set(mine) & set(theirs))
            if seeds:
                a, b = theirs[seeds[0]], mine[seeds[0]]
                cells.append(f"{a:.1f} / {b:.1f} ({b - a:+.1f})")
            else:
                cells.append("–")
        if any(c != "–" for c in cells):
            lines.append(f"| {method} | {label} | {baseline} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_main(argv):
    full = COMPARE_STEPS
    p = argparse.ArgumentParser(prog="lab.budget", description="Each method's target and its baselines' at "
                                "several training budgets, one seed (shapes world).")
    p.add_argument("--steps", default=f"{full // 4},{full // 2},{full}",
                   help="comma-separated step counts (default: a quarter, a half and all of the comparison's budget)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run")
    p.add_argument("--methods", default=",".join(COMPARE_DEFAULT_METHODS),
                   help=f"comma-separated subset of {list(COMPARE_METHODS)} (default: all but "
                        f"{', '.join(COMPARE_OPTIONAL)})")
    p.add_argument("--out", default="runs/budget", help="folder of the runs (steps-<N>/<method>-seed<seed>) and of "
                   "budget.md")
    p.add_argument("--reuse", default="runs/compare", help="folder of `lab.compare` runs: a finished run there "
                   "with the same method, seed and step count is used instead of training it again")
    p.add_argument("--extra", default="", help="extra flags passed to every run")
    _add_parallel_flags(p)
    p.add_argument("--no-train", action="store_true", help="train nothing: tabulate the finished runs")
    args = p.parse_args(argv)
    methods = _parse_methods(args.methods, "budget")
    try:
        budgets = sorted({int(n) for n in args.steps.split(",")})
    except ValueError:
        raise SystemExit(f"lab.budget: --steps {args.steps!r}: expected comma-separated step counts") from None
    runs_by_steps, jobs = OrderedDict(), []
    for n in budgets:
        runs_by_steps[n] = OrderedDict()
        for m in methods:
            run_dir = Path(args.out) / f"steps-{n}" / f"{m}-seed{args.seed}"
            reused = Path(args.reuse) / f"{m}-seed{args.seed}"
            if not (run_dir / "results.json").exists() and (reused / "results.json").exists() and \
                    json.loads((reused / "config.json").read_text()).get("steps") == n:
                run_dir = reused
            if (run_dir / "results.json").exists() or not args.no_train:
                runs_by_steps[n][m] = [run_dir]
            if not (run_dir / "results.json").exists() and not args.no_train:
                jobs.append((m, args.seed, run_dir, n))
    # cheapest budgets first: an interrupted `lab.budget` leaves whole rows, not one long run half done
    _train_missing(sorted(jobs, key=lambda job: job[3]), args)
    table = (f"Each method's target and its baselines' (shapes suite, %, seed {args.seed}) after {', '.join(map(str, budgets))} "
             f"steps:\n\n" + budget_table(runs_by_steps))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    evaluation._atomic_write(Path(args.out) / "budget.md", table + "\n")
    print(table)
    return table




if __name__ == "__main__":
    budget_main(sys.argv[1:])
