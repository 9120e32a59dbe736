"""Tokens and FLOPs of a recipe, per step and per produced model, against training the same
models from scratch (``minitron run`` writes it to WORKDIR/cost.json and cost.md).

    cost = recipe_cost(load_recipe("examples/smollm2_cpu.yaml"))
    print(write_cost(cost, "outputs/smollm2"))

Cost (the compute claim of arXiv 2407.14679), with N a model's exact parameter count
(:func:`megatron_minitron.config.count_parameters`; for a mixture-of-experts model the
parameters one token passes through, its ``active`` count, while tables still show the total)
and T tokens:

- training step (teacher_correction, distill, train): 6·N_trained·T, plus 2·N_teacher·T for the
  teacher's forward when distilling; T is the tokens actually trained (the final checkpoint's
  meta) or, planned, ``train_tokens`` rounded up to whole steps;
- importance: 2·N·T with T = num_samples·seq_length for the scoring pass plus
  (num_layers + 1)·depth_samples·seq_length for the depth metrics (a forward per skipped layer
  and one for Block Importance, each counted as a full forward);
- eval: 2·N·samples·seq_length of the LM-loss text (task scoring is not counted);
- search: Σ over candidates of 6·N_candidate·retrain_tokens (+ 2·N_teacher·retrain_tokens when
  its retraining distills), from the search's ``search.json`` when present, else planned;
- prune: 0 (a weight copy).

A produced model (each distill output, and each pruned/searched model no distill step trains)
costs the sum of its own step and every step it derives from. Against training from scratch on
``scratch_tokens`` tokens each:

- models only (teacher excluded): ratio = Σ_models 6·N·scratch_tokens / Σ_steps FLOPs;
- whole family (teacher included, its pretraining counted once on both sides):
  ratio = (6·N_teacher·S + Σ_models 6·N·S) / (6·N_teacher·S + Σ_steps FLOPs), S = scratch_tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.files import read_json
from megatron_minitron.recipe import (
    TRAINING,
    Recipe,
    Step,
    checkpoint_info,
    parse_step,
    step_done,
)


class _Models:
    """Model configs by path: loaded where the checkpoint exists, planned otherwise."""

    def __init__(self):
        self.planned: Dict[str, Optional[ModelConfig]] = {}

    def config(self, path: Optional[str]) -> Optional[ModelConfig]:
        if not path:
            return None
        info = checkpoint_info(path)
        if info is not None:
            return ModelConfig.from_dict(info["model"])
        return self.planned.get(path)

    def params(self, path: Optional[str]) -> Optional[int]:
        cfg = self.config(path)
        return count_parameters(cfg)["total"] if cfg is not None else None

    def active(self, path: Optional[str]) -> Optional[int]:
        """Parameters a token passes through (what FLOPs count; the total for dense models)."""
        cfg = self.config(path)
        return count_parameters(cfg)["active"] if cfg is not None else None


def planned_models(recipe: Recipe) -> _Models:
    """Every step's model config (read where its checkpoint exists, planned otherwise)."""
    models = _Models()
    for step in recipe.steps:
        step_cost(step, models)
    return models


def _pruned_config(args, source: Optional[ModelConfig]) -> Optional[ModelConfig]:
    from megatron_minitron.prune.plan import parse_target, target_config

    if source is None:
        return None
    try:
        target = parse_target(args.target or "")
        if args.drop_layers:
            target.setdefault("num_layers", source.num_layers - len(args.drop_layers.split(",")))
        return target_config(source, target)
    except (UsageError, ValueError):
        return None


def _times(*values) -> Optional[int]:
    if any(v is None for v in values):
        return None
    product = 1
    for value in values:
        product *= int(value)
    return product


def _training_tokens(step: Step, args) -> tuple:
    """(tokens, measured): from the final checkpoint's meta, else whole steps of the plan."""
    info = checkpoint_info(step.output)
    if info is not None and info.get("meta", {}).get("tokens") is not None:
        return int(info["meta"]["tokens"]), True
    from megatron_minitron.distill.config import TrainConfig

    try:
        config = TrainConfig.from_args(args)
    except (UsageError, ValueError):
        return None, False
    if None in (config.train_tokens, config.global_batch_size, config.seq_length):
        return None, False
    return config.train_steps() * config.global_batch_size * config.seq_length, False


def _importance_tokens(args, cfg: Optional[ModelConfig]) -> Optional[int]:
    main = _times(args.num_samples, args.seq_length)
    if main is None or not args.depth:
        return main
    if cfg is None:
        return None
    depth = min(args.depth_samples or args.num_samples, args.num_samples)
    return main + (cfg.num_layers + 1) * depth * args.seq_length


def _eval_tokens(step: Step, args) -> tuple:
    """(tokens, measured) of the LM-loss text; 0 for tasks only, None when the plan cannot
    tell (every window of the data, --num-samples unset)."""
    result = read_json(step.output)
    if result is not None:
        return _times(result["samples"], result["seq_length"]) if "samples" in result else 0, True
    if not (args.text_file or args.data_prefix):
        return 0, False
    return _times(args.num_samples, args.seq_length), False


def _search_cost(step: Step, args, models: _Models) -> tuple:
    """(tokens, flops, measured) of a search: each candidate's retraining, read from the
    search's search.json when present, else planned from its space and budget."""
    teacher = models.active(args.teacher or args.load)
    report = read_json(os.path.join(os.path.dirname(step.output), "search.json"))
    if report is not None:
        runs = [(c.get("active_params", c["params"]), int(c.get("retrain_tokens") or 0))
                for c in report.get("candidates", [])]
        measured = True
    else:
        runs, measured = _planned_search(args, models), False
    if runs is None or teacher is None:
        return None, None, measured
    tokens = sum(t for _, t in runs)
    return tokens, sum((6 * n + 2 * teacher) * t for n, t in runs), measured


def _planned_search(args, models: _Models) -> Optional[List[tuple]]:
    """[(params, retrain tokens)] of every candidate the search would retrain."""
    from megatron_minitron.distill.config import TrainConfig
    from megatron_minitron.search.space import enumerate_candidates, load_space, parse_params

    source = models.config(args.load)
    if source is None:
        return None
    try:
        active = getattr(args, "active_params", None) is not None
        budget = parse_params(args.active_params if active else args.params)
        candidates, _ = enumerate_candidates(source, load_space(args.space, source), budget,
                                             args.tolerance, args.tp, args.pp,
                                             budget="active" if active else "total")
        tokens = 0
        if args.retrain:
            config = TrainConfig.from_args(args, train_tokens=args.retrain_tokens)
            tokens = config.train_steps() * config.global_batch_size * config.seq_length
    except (UsageError, ValueError, TypeError):
        return None
    return [(count_parameters(c.config)["active"], tokens) for c in candidates]


def step_cost(step: Step, models: _Models) -> Dict[str, Any]:
    """Tokens and FLOPs of one step (see the module docstring); records planned model configs."""
    args = parse_step(step)
    row: Dict[str, Any] = {"name": step.name, "stage": step.stage, "done": step_done(step),
                           "params": None, "teacher_params": None, "tokens": None, "flops": None}
    if step.stage in TRAINING:
        models.planned[step.output] = models.config(args.student)
        row["params"] = models.params(args.student)
        row["teacher_params"] = models.params(getattr(args, "teacher", None))
        row["has_teacher"] = bool(getattr(args, "teacher", None))
        row["tokens"], row["measured"] = _training_tokens(step, args)
        teacher = models.active(getattr(args, "teacher", None)) or 0
        trained = models.active(args.student)
        if trained is not None and row["tokens"] is not None:
            row["flops"] = (6 * trained + 2 * teacher) * row["tokens"]
    elif step.stage == "prune":
        models.planned[step.output] = _pruned_config(args, models.config(args.load))
        row.update(params=models.params(step.output), tokens=0, flops=0)
    elif step.stage == "search":
        row["params"] = models.params(step.output)
        row["teacher_params"] = models.params(args.teacher or args.load)
        row["has_teacher"] = True
        row["tokens"], row["flops"], row["measured"] = _search_cost(step, args, models)
    else:
        cfg = models.config(args.load)
        row["params"] = count_parameters(cfg)["total"] if cfg is not None else None
        if step.stage == "importance":
            row["tokens"] = _importance_tokens(args, cfg)
        else:
            row["tokens"], row["measured"] = _eval_tokens(step, args)
        if row["params"] is not None and row["tokens"] is not None:
            row["flops"] = 2 * count_parameters(cfg)["active"] * row["tokens"]
    return row


def _produced_models(recipe: Recipe) -> List[Step]:
    students = set()
    for step in recipe.steps:
        if step.stage in ("distill", "train"):
            students.update(step.refs)
    return [step for step in recipe.steps if step.stage in ("distill", "train")
            or (step.stage in ("prune", "search") and step.name not in students)]


def _lineage(step: Step, by_name: Dict[str, Step]) -> List[str]:
    seen, todo = [], [step.name]
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.append(name)
        todo.extend(by_name[name].refs)
    return seen


def _sum(values) -> Optional[int]:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def recipe_cost(recipe: Recipe, seconds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Per step, per produced model and in total: tokens, FLOPs and the from-scratch ratio."""
    models = _Models()
    rows = [step_cost(step, models) for step in recipe.steps]
    for row in rows:
        if seconds and row["name"] in seconds:
            row["seconds"] = round(seconds[row["name"]], 2)
    flops = {row["name"]: row["flops"] for row in rows}
    by_name = {step.name: step for step in recipe.steps}
    teacher_params = models.params(recipe.teacher)
    scratch = recipe.scratch_tokens
    produced = []
    for step in _produced_models(recipe):
        lineage = _lineage(step, by_name)
        params = models.params(step.output)
        model = {"name": step.name, "checkpoint": step.output, "params": params,
                 "steps": lineage,
                 "tokens": _sum(r["tokens"] for r in rows
                                if r["name"] in lineage
                                and r["stage"] in TRAINING + ("search",)),
                 "flops": _sum(flops[name] for name in lineage)}
        if scratch and params is not None:
            model["scratch_flops"] = 6 * models.active(step.output) * scratch
            model["ratio"] = (model["scratch_flops"] / model["flops"]) if model["flops"] else None
        produced.append(model)
    total = {"tokens": _sum(r["tokens"] for r in rows), "flops": _sum(flops.values()),
             "teacher_params": teacher_params, "scratch_tokens": scratch}
    scratch_models = _sum(m.get("scratch_flops") for m in produced) if scratch else None
    if scratch_models is not None and total["flops"]:
        total.update(scratch_flops_models=scratch_models,
                     ratio_models=scratch_models / total["flops"])
        if teacher_params is not None:
            pretrain = 6 * models.active(recipe.teacher) * scratch
            total.update(teacher_pretrain_flops=pretrain,
                         scratch_flops_family=pretrain + scratch_models,
                         flops_family=pretrain + total["flops"],
                         ratio_family=(pretrain + scratch_models) / (pretrain + total["flops"]))
    planned = not all(row["done"] for row in rows)
    return {"recipe": recipe.name, "planned": planned, "steps": rows, "models": produced,
            "total": total, "formula": FORMULA}


FORMULA = ("training: 6·N·T (+ 2·N_teacher·T when distilling); importance and eval: 2·N·T; "
           "search: Σ_candidates 6·N_c·T_retrain (+ 2·N_teacher·T_retrain); prune: 0. "
           "From scratch: 6·N·scratch_tokens per model. ratio_models = Σ_models scratch / Σ_steps"
           " (teacher excluded); ratio_family = (6·N_teacher·S + Σ_models scratch) / "
           "(6·N_teacher·S + Σ_steps) (teacher included, its pretraining counted once on both "
           "sides).")


NOT_APPLICABLE = "–"
UNKNOWN = "?"
LEGEND = (f"{UNKNOWN} = not known yet (the step's input model does not exist yet; a dry run "
          f"before the first steps ran); {NOT_APPLICABLE} = does not apply (no teacher in that "
          "step, or no `scratch_tokens:` in the recipe to compare with from-scratch training).")


def _fmt(value, kind: str = "int", applies: bool = True) -> str:
    if not applies:
        return NOT_APPLICABLE
    if value is None:
        return UNKNOWN
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "flops":
        return f"{value:.3e}"
    return f"{value:,}"


def format_cost(cost: Dict[str, Any]) -> str:
    """The cost report as Markdown tables."""
    lines = [f"# Cost of recipe {cost['recipe']}" + (" (planned)" if cost["planned"] else ""),
             "", "| step | stage | N | N teacher | tokens | FLOPs | status |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in cost["steps"]:
        status = "done" if row["done"] else "planned"
        lines.append(f"| {row['name']} | {row['stage']} | {_fmt(row['params'])} | "
                     f"{_fmt(row['teacher_params'], applies=row.get('has_teacher', False))} | "
                     f"{_fmt(row['tokens'])} | "
                     f"{_fmt(row['flops'], 'flops')} | {status} |")
    lines += ["", "| model | N | trained tokens | FLOPs (with its ancestors) | from scratch | "
              "scratch ÷ ours |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    scratch = cost["total"].get("scratch_tokens") is not None
    for model in cost["models"]:
        lines.append(f"| {model['name']} | {_fmt(model['params'])} | {_fmt(model['tokens'])} | "
                     f"{_fmt(model['flops'], 'flops')} | "
                     f"{_fmt(model.get('scratch_flops'), 'flops', scratch)} | "
                     f"{_fmt(model.get('ratio'), 'ratio', scratch)} |")
    total = cost["total"]
    lines += ["", f"total: {_fmt(total['tokens'])} tokens trained or forwarded, "
              f"{_fmt(total['flops'], 'flops')} FLOPs"]
    if "ratio_models" in total:
        lines.append(f"from scratch ({_fmt(total['scratch_tokens'])} tokens per model), models "
                     f"only (teacher excluded): {_fmt(total['scratch_flops_models'], 'flops')} "
                     f"FLOPs = {_fmt(total['ratio_models'], 'ratio')} ours")
    if "ratio_family" in total:
        lines.append(f"whole family (teacher included): "
                     f"{_fmt(total['scratch_flops_family'], 'flops')} vs "
                     f"{_fmt(total['flops_family'], 'flops')} FLOPs = "
                     f"{_fmt(total['ratio_family'], 'ratio')}")
    lines += ["", LEGEND, "", f"Formula: {cost['formula']}"]
    return "\n".join(lines)


def write_cost(cost: Dict[str, Any], workdir: str) -> str:
    """Writes WORKDIR/cost.json and WORKDIR/cost.md; returns the Markdown."""
    os.makedirs(workdir, exist_ok=True)
    text = format_cost(cost)
    for name, body in (("cost.json", json.dumps(cost, indent=2)), ("cost.md", text + "\n")):
        path = os.path.join(workdir, name)
        with open(path + ".tmp", "w") as handle:
            handle.write(body)
        os.replace(path + ".tmp", path)
    return text
