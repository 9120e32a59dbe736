"""Before/after report of a finished recipe: one table and three plots.

    python -m megatron_minitron.report examples/smollm2_cpu.yaml   # or WORKDIR (its recipe.yaml)

    summary = build_summary(load_recipe(path))   # models, metrics, cost, plots
    print(format_table(summary))

Every ``eval`` step of the recipe is one row, named after the step (``eval_pruned`` → ``pruned``):
the exact parameter count of the checkpoint it loads (from ``minitron_config.json``), its
held-out LM loss and perplexity and its zero-shot task accuracies, as its results file holds
them. Under the table: the recipe's cost line (``WORKDIR/cost.json``) and each step's seconds.

Written to WORKDIR: ``summary.md`` and ``summary.json``, ``metrics.png`` (the table as bars),
``NAME_loss.png`` per training step (train loss and cross-entropy against trained tokens from
``NAME/log.jsonl``, validation points on top); the importance step already wrote its own
``NAME.png`` beside its SCORES file, which the summary lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.files import read_json
from megatron_minitron.recipe import TRAINING, checkpoint_info, load_recipe, parse_step

RECIPE_IN_WORKDIR = "recipe.yaml"


def _params(checkpoint: str) -> Optional[int]:
    info = checkpoint_info(checkpoint)
    if info is None:
        return None
    return count_parameters(ModelConfig.from_dict(info["model"]))["total"]


def model_rows(recipe) -> List[Dict[str, Any]]:
    """One row per eval step whose results file exists, in recipe order."""
    rows = []
    for step in recipe.steps:
        if step.stage != "eval":
            continue
        result = read_json(step.output)
        if result is None:
            continue
        load = parse_step(step).load
        name = step.name[len("eval_"):] if step.name.startswith("eval_") else step.name
        row = {"name": name, "step": step.name, "checkpoint": load, "params": _params(load),
               "results": step.output}
        for key in ("loss", "ppl", "tokens", "samples", "seq_length", "limit"):
            if key in result:
                row[key] = result[key]
        measured = result.get("tasks", {})
        row["tasks"] = {task: metrics["acc"] for task, metrics in measured.items()}
        row["tasks_stderr"] = {task: metrics.get("acc_stderr") for task, metrics in
                               measured.items()}
        row["chance"] = {task: metrics["chance"] for task, metrics in measured.items()
                         if "chance" in metrics}
        if row["tasks"]:
            row["items"] = {task: metrics["items"] for task, metrics in measured.items()}
        if "items_per_second" in result:
            row["items_per_second"] = result["items_per_second"]
        rows.append(row)
    return rows


def read_log(path: str) -> Dict[str, List[Dict[str, float]]]:
    """``log.jsonl`` of a training run: train and validation records, each with ``tokens_seen``
    (training tokens up to and including its step)."""
    train, valid = [], []
    if not os.path.isfile(path):
        return {"train": train, "valid": valid}
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a killed job
                continue
            (train if record.get("split") == "train" else valid).append(record)
    seen, by_step = 0, {}
    for record in sorted(train, key=lambda r: r["step"]):
        seen += int(record.get("tokens") or 0)
        record["tokens_seen"] = by_step[record["step"]] = seen
    for record in valid:
        record["tokens_seen"] = by_step.get(record["step"], 0)
    return {"train": train, "valid": valid}


def build_summary(recipe) -> Dict[str, Any]:
    """Rows, cost and the plot files (existing ones only; :func:`write_report` makes them)."""
    cost = read_json(os.path.join(recipe.workdir, "cost.json"))
    summary: Dict[str, Any] = {"recipe": recipe.name, "workdir": recipe.workdir,
                               "models": model_rows(recipe), "cost": None, "seconds": {},
                               "importance_plots": [], "training_logs": {}}
    if cost is not None:
        summary["cost"] = cost["total"]
        summary["seconds"] = {row["name"]: row["seconds"] for row in cost["steps"]
                              if row.get("seconds") is not None}
    for step in recipe.steps:
        if step.stage == "importance":
            png = os.path.splitext(step.output)[0] + ".png"
            if os.path.isfile(png):
                summary["importance_plots"].append(png)
        if step.stage in TRAINING:
            log = os.path.join(os.path.dirname(step.output), "log.jsonl")
            if os.path.isfile(log):
                summary["training_logs"][step.name] = log
    return summary


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _acc(row: Dict[str, Any], task: str) -> str:
    """``0.680 ± 0.047``: accuracy ± one standard error over items."""
    acc = row["tasks"].get(task)
    stderr = row.get("tasks_stderr", {}).get(task)
    return _num(acc, ".3f") + (f" ± {stderr:.3f}" if acc is not None and stderr else "")


def format_table(summary: Dict[str, Any]) -> str:
    """The before/after table (Markdown) with the cost and time lines under it."""
    rows = summary["models"]
    tasks = []
    for row in rows:
        tasks += [task for task in row["tasks"] if task not in tasks]
    header = ["model", "parameters", "held-out loss", "perplexity", *tasks]
    if tasks:
        header.append("mean acc")
    lines = [f"# Recipe {summary['recipe']}: before and after", "",
             "| " + " | ".join(header) + " |",
             "| --- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        cells = [row["name"], _num(row["params"], ","), _num(row.get("loss"), ".4f"),
                 _num(row.get("ppl"), ".2f")]
        cells += [_acc(row, task) for task in tasks]
        if tasks:
            accs = [row["tasks"][task] for task in tasks if task in row["tasks"]]
            cells.append(_num(sum(accs) / len(accs) if len(accs) == len(tasks) else None, ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    text = next((r for r in rows if "samples" in r), None)
    if text is not None:
        notes.append(f"held-out loss: mean token cross-entropy over {text['samples']} windows of "
                     f"{text['seq_length']} tokens; perplexity = exp(loss)")
    items = next((r for r in rows if r.get("items")), None)
    if items is not None:
        chance = items.get("chance", {})
        notes.append("accuracy: zero-shot, first " + ", ".join(
            f"{count} {task}" + (f" (chance {chance[task]:.2f})" if task in chance else "")
            for task, count in items["items"].items()) + " items; ± one standard error")
    cost = summary.get("cost")
    if cost is not None:
        notes.append(f"cost: {_num(cost.get('tokens'), ',')} tokens trained or forwarded, "
                     f"{_num(cost.get('flops'), '.3e')} FLOPs (cost.md)")
    if summary.get("seconds"):
        steps = ", ".join(f"{name} {sec:.0f} s" for name, sec in summary["seconds"].items())
        notes.append(f"time: {steps}; {sum(summary['seconds'].values()) / 60:.1f} min in all")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(log: Dict[str, List[Dict[str, float]]], path: str, title: str) -> str:
    """Train loss (and cross-entropy, when it differs) against trained tokens; validation
    points on top."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    train, valid = log["train"], log["valid"]
    curves = [("loss", "train loss", "C0")]
    if any(abs(r.get("ce", r["loss"]) - r["loss"]) > 1e-9 for r in train + valid):
        curves = [("loss", "train loss (objective)", "C0"),
                  ("ce", "train cross-entropy", "C1")]
    for key, label, color in curves:
        if train:
            ax.plot([r["tokens_seen"] for r in train], [r[key] for r in train], color=color,
                    marker=".", label=label)
        points = [r for r in valid if key in r]
        if points:
            ax.scatter([r["tokens_seen"] for r in points], [r[key] for r in points],
                       color=color, marker="s", s=40, edgecolor="black", zorder=3,
                       label=label.replace("train", "validation"))
    ax.set_xlabel("trained tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics(summary: Dict[str, Any], path: str) -> str:
    """The table as bars: held-out loss per model, and each task's accuracy per model."""
    plt = _pyplot()
    rows = summary["models"]
    tasks = []
    for row in rows:
        tasks += [task for task in row["tasks"] if task not in tasks]
    panels = 2 if tasks else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 4 * (panels - 1), 4), squeeze=False)
    names = [row["name"] for row in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    ax = axes[0][0]
    losses = [row.get("loss") or 0.0 for row in rows]
    bars = ax.bar(names, losses, color=colors)
    for bar, row in zip(bars, rows):
        if row.get("params") is not None:
            ax.annotate(f"{row['params'] / 1e6:.1f}M", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out LM loss (lower is better)")
    ax.set_title("loss (bar labels: parameters)")
    if tasks:
        ax = axes[0][1]
        width = 0.8 / max(len(rows), 1)
        for index, row in enumerate(rows):
            xs = [t + (index - (len(rows) - 1) / 2) * width for t in range(len(tasks))]
            errors = [row.get("tasks_stderr", {}).get(task) or 0.0 for task in tasks]
            ax.bar(xs, [row["tasks"].get(task, 0.0) for task in tasks], width, label=row["name"],
                   color=colors[index], yerr=errors, capsize=3, ecolor="0.3")
        chance = {}
        for row in rows:
            chance.update(row.get("chance", {}))
        for position, task in enumerate(t for t in tasks if t in chance):
            ax.hlines(chance[task], tasks.index(task) - 0.45, tasks.index(task) + 0.45,
                      colors="k", linestyles="dashed", label=None if position else "chance")
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks)
        ax.set_ylabel("zero-shot accuracy (± 1 s.e.)")
        ax.set_ylim(0, 1)
        ax.set_title("tasks")
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary['recipe']}: before and after")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files

def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def write_report(recipe, plots: bool = True) -> Dict[str, Any]:
    """Writes summary.md, summary.json and the plots into WORKDIR; returns the summary."""
    summary = build_summary(recipe)
    if not summary["models"]:
        raise UsageError(f"recipe {recipe.name}: no eval step has results in {recipe.workdir} "
                         "yet; run the recipe first")
    summary["plots"] = list(summary["importance_plots"])
    if plots:
        for name, log in summary["training_logs"].items():
            path = os.path.join(recipe.workdir, f"{name}_loss.png")
            summary["plots"].append(plot_training(read_log(log), path, f"{recipe.name}: {name}"))
        summary["plots"].append(plot_metrics(summary, os.path.join(recipe.workdir,
                                                                   "metrics.png")))
    text = format_table(summary)
    if summary["plots"]:
        text += "\n- plots: " + ", ".join(os.path.basename(p) for p in summary["plots"])
    summary["table"] = text
    _write(os.path.join(recipe.workdir, "summary.md"), text + "\n")
    _write(os.path.join(recipe.workdir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def recipe_path(path: str) -> str:
    """A recipe file, or a WORKDIR holding recipe.yaml."""
    if os.path.isdir(path):
        inside = os.path.join(path, RECIPE_IN_WORKDIR)
        if not os.path.isfile(inside):
            raise UsageError(f"{path} holds no {RECIPE_IN_WORKDIR}; pass the recipe file")
        return inside
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_minitron.report",
        description="Before/after table (summary.md/.json) and plots of a finished recipe.")
    parser.add_argument("recipe", help="recipe YAML file, or its WORKDIR holding recipe.yaml")
    parser.add_argument("--no-plots", dest="plots", action="store_false",
                        help="write the table only")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(recipe_path(args.recipe))
        summary = write_report(recipe, plots=args.plots)
    except UsageError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    print(summary["table"])
    print(f"written: {os.path.join(recipe.workdir, 'summary.md')}, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
