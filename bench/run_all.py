"""Every benchmark of the project in one command, then one summary table.

    python bench/run_all.py                 # each benchmark at its own (small) default size
    python bench/run_all.py --quick         # smaller inputs (importance_quick.json, ...)
    python bench/run_all.py --only prune    # a subset (importance, prune, distill, prune_quality,
                                            # forward_vs_hf)
    python bench/run_all.py --summary-only  # no runs: summarise bench/results/*.json as they are

Runs bench/importance.py, bench/prune.py, bench/distill.py and bench/forward_vs_hf.py, each in
its own process, then reads every bench/results/*.json, prints one row per result (the device it
came from, its key figures, its goal and which goal clauses hold) and writes
bench/results/summary.json. bench/prune_quality.py (the real SmolLM2-135M, minutes) runs only
when named with --only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SUMMARY = os.path.join(RESULTS, "summary.json")

# name -> (script, its arguments at --quick)
BENCHMARKS: Dict[str, tuple] = {
    "importance": ("importance.py", ["--samples", "8", "--seq-length", "128", "--repeats", "3",
                                     "--name", "quick"]),
    "prune": ("prune.py", ["--name", "quick"]),
    "distill": ("distill.py", []),
    "prune_quality": ("prune_quality.py", ["--calib-samples", "16", "--eval-samples", "8"]),
    "forward_vs_hf": ("forward_vs_hf.py", ["--samples", "4", "--seq-length", "128", "--rounds",
                                           "3", "--name", "quick"]),
}
DEFAULT = ("importance", "prune", "distill", "forward_vs_hf")
FIGURE = re.compile(r"(ratio|_s$|_mb$|tokens_per_s|loss|ceiling|gflops)")  # kept in summary.json
HEADLINE = re.compile(r"(ratio|tokens_per_s|loss|extra|ceiling)")  # printed in the table
CLAUSE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")


def run_benchmark(name: str, quick: bool) -> Dict:
    """Runs one benchmark script in its own process; its output goes straight to the console."""
    script, quick_args = BENCHMARKS[name]
    path = os.path.join(HERE, script)
    argv = [sys.executable, path] + (quick_args if quick else [])
    print(f"== {name}: {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(argv, cwd=os.path.dirname(HERE)).returncode
    seconds = time.perf_counter() - start
    print(f"== {name}: exit {code} after {seconds:.0f} s", flush=True)
    return {"benchmark": name, "argv": argv[1:], "returncode": code, "seconds": seconds}


def check_goal(goal: str, result: Dict) -> List[str]:
    """Evaluates the goal's "name <= number" clauses against the result's own fields."""
    checks = []
    for clause in (part.strip() for part in goal.split(";") if part.strip()):
        match = CLAUSE.match(clause)
        if not match or not isinstance(result.get(match.group(1)), (int, float)):
            checks.append(f"{clause}: not checked")
            continue
        name, operator, bound = match.group(1), match.group(2), float(match.group(3))
        value = float(result[name])
        holds = {"<=": value <= bound, ">=": value >= bound, "<": value < bound,
                 ">": value > bound}[operator]
        checks.append(f"{clause}: {'yes' if holds else 'NO'} ({value:.3g})")
    return checks


OPEN_GOALS = os.path.join(HERE, "open_goals.json")
"""Results whose goal is known not to be met yet, each with why (reviewed and committed); a
result listed there that meets its goal, or a failing one missing from it, fails the tests."""


def open_goals() -> Dict[str, str]:
    if not os.path.isfile(OPEN_GOALS):
        return {}
    with open(OPEN_GOALS) as handle:
        return json.load(handle)


def summarise(path: str) -> Dict:
    with open(path) as handle:
        result = json.load(handle)
    environment = result.get("environment") or {}
    figures = {key: value for key, value in result.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)
               and FIGURE.search(key)}
    goal = result.get("goal", "")
    return {"result": os.path.basename(path)[:-len(".json")],
            "device": environment.get("device", "unknown"),
            "torch": environment.get("torch", ""), "figures": figures, "goal": goal,
            "checks": check_goal(goal, result) if goal else [],
            "open": open_goals().get(os.path.basename(path)[:-len(".json")])}


def collect(results_dir: str = RESULTS) -> List[Dict]:
    if not os.path.isdir(results_dir):
        return []
    names = sorted(name for name in os.listdir(results_dir)
                   if name.endswith(".json") and name != os.path.basename(SUMMARY))
    return [summarise(os.path.join(results_dir, name)) for name in names]


def table(rows: List[Dict]) -> str:
    columns = ["result", "device", "key figures", "goal check"]
    body = []
    for row in rows:
        figures = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row["figures"].items() if HEADLINE.search(k))
        checks = [check.split(" (")[0] for check in row["checks"]]
        verdict = "; ".join(checks) or "-"
        if row.get("open"):
            verdict += " [open goal]"
        body.append([row["result"], row["device"], figures, verdict])
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs (importance and prune write *_quick.json)")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing; summarise the existing results")
    parser.add_argument("--summary", default=SUMMARY,
                        help="where the summary JSON goes (default bench/results/summary.json)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(DEFAULT)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    runs = []
    if not args.summary_only:
        for name in names:
            if not os.path.exists(os.path.join(HERE, BENCHMARKS[name][0])):
                print(f"== {name}: bench/{BENCHMARKS[name][0]} does not exist yet, skipped")
                runs.append({"benchmark": name, "skipped": "script missing"})
                continue
            runs.append(run_benchmark(name, args.quick))
    rows = collect()
    print(table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
    with open(args.summary + ".tmp", "w") as handle:
        json.dump({"runs": runs, "results": rows}, handle, indent=2)
    os.replace(args.summary + ".tmp", args.summary)
    print(f"wrote {args.summary}")
    failed = [run["benchmark"] for run in runs if run.get("returncode")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
