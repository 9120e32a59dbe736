"""Recipes: one YAML file chaining teacher correction, importance, search or prune, distillation
and evaluation (``minitron run RECIPE.yaml``; schema in examples/README.md).

    recipe = load_recipe("examples/smollm2_cpu.yaml")  # validated; UsageError on a bad value
    for step in recipe.steps:
        print(step.command_line(), step_done(step))
    cost = recipe_cost(recipe)                          # tokens and FLOPs per step and model
    write_cost(cost, recipe.workdir)                    # WORKDIR/cost.json and cost.md

Every step's command line is parsed by the real ``minitron`` parser when the recipe loads, so a
bad key or value fails before any stage runs.

Cost (the compute claim of arXiv 2407.14679), with N a model's exact parameter count
(:func:`megatron_minitron.config.count_parameters`) and T tokens:

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

import argparse
import contextlib
import io
import json
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.files import read_json

STAGE_COMMANDS = {"teacher_correction": "correct-teacher", "importance": "importance",
                  "prune": "prune", "search": "search", "distill": "distill", "train": "train",
                  "eval": "eval"}
# per stage: (the --output/--json the runner sets, what "@NAME" means), under WORKDIR
OUTPUTS = {"teacher_correction": ("{}", "{}/final"), "distill": ("{}", "{}/final"),
           "train": ("{}", "{}/final"),
           "importance": ("{}.pt", "{}.pt"), "prune": ("{}", "{}"), "search": ("{}", "{}/best"),
           "eval": ("{}.json", "{}.json")}
TRAINING = ("teacher_correction", "distill", "train")
RECIPE_KEYS = ("name", "workdir", "teacher", "common", "steps", "scratch_tokens")
RUNNER_KEYS = ("output", "json")  # set by the runner from the step name
CONFIG_FILE = "minitron_config.json"  # as megatron_minitron.checkpoint.io


@dataclass
class Step:
    """One stage call: ``minitron COMMAND ARGV...``."""

    stage: str
    name: str
    argv: List[str]
    """Everything after ``minitron COMMAND``, references resolved."""
    output: str
    """What ``@NAME`` means: the checkpoint, SCORES file or results file this step makes."""
    refs: List[str] = field(default_factory=list)
    """Names of the earlier steps (and ``teacher``) whose outputs it reads."""

    @property
    def command(self) -> str:
        return STAGE_COMMANDS[self.stage]

    def command_line(self) -> str:
        return shlex.join(["minitron", self.command, *self.argv])


@dataclass
class Recipe:
    """A validated recipe: paths as written (``~`` expanded), steps in order."""

    name: str
    workdir: str
    teacher: str
    steps: List[Step]
    scratch_tokens: Optional[int] = None
    """Tokens each model would be pretrained on from scratch (for the cost comparison)."""


# ----------------------------------------------------------------------------- parsing

def _subparser(command: str) -> argparse.ArgumentParser:
    from megatron_minitron import cli

    try:
        parser = cli.build_parser(only=command)
    except ImportError as err:
        raise UsageError(f"`minitron {command}` cannot be loaded here ({err}); drop its steps "
                         "or install what it needs") from None
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def command_flags(command: str) -> set:
    """Every option string of ``minitron COMMAND``."""
    return {flag for action in _subparser(command)._actions for flag in action.option_strings}


def parse_step(step: Step) -> argparse.Namespace:
    """The step's argv parsed by the real ``minitron`` parser; argparse errors → one line."""
    from megatron_minitron import cli

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.build_parser(only=step.command).parse_args([step.command, *step.argv])
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        reason = lines[-1].split("error: ", 1)[-1] if lines else "rejected"
        raise UsageError(f"step {step.name}: minitron {step.command} {reason}; fix the step's "
                         "keys (see `minitron " + step.command + " --help`)") from None


def _flag_words(key: str, value: Any) -> List[str]:
    """One key/value as command-line words (the schema's value rules)."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return []
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + key.replace("_", "-")]
    if isinstance(value, dict):
        return [flag, ",".join(f"{k}={v}" for k, v in value.items())]
    if isinstance(value, list):
        return [flag, *(os.path.expanduser(str(item)) for item in value)]
    return [flag, os.path.expanduser(str(value))]


def _resolve(name: str, key: str, value: Any, outputs: Dict[str, str], later: set, refs: list):
    """``"@NAME"`` (alone or in a list) → that step's output path."""
    if isinstance(value, list):
        return [_resolve(name, key, item, outputs, later, refs) for item in value]
    if not (isinstance(value, str) and value.startswith("@")):
        return value
    target = value[1:]
    if target in outputs:
        refs.append(target)
        return outputs[target]
    if target in later:
        raise UsageError(f"step {name}: {key}: {value} is a later step; move step {target} "
                         f"before {name}")
    raise UsageError(f"step {name}: {key}: {value} names no step; use @teacher or one of the "
                     f"earlier steps ({', '.join(outputs)})")


def read_recipe_file(path: str) -> Dict[str, Any]:
    """The YAML mapping of a recipe file; UsageError when missing, unreadable or not a mapping."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"recipe {path} does not exist; pass a YAML file (see examples/)")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise UsageError(f"recipe {path} is not valid YAML ({detail})") from None
    if not isinstance(data, dict):
        raise UsageError(f"recipe {path} must be a mapping with workdir, teacher and steps "
                         f"(it holds a {type(data).__name__})")
    return data


def _check_top_level(path: str, data: Dict[str, Any]) -> None:
    unknown = sorted(set(map(str, data)) - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(f"recipe {path}: unknown key(s) {', '.join(unknown)}; use "
                         f"{', '.join(RECIPE_KEYS)}")
    for key in ("workdir", "teacher"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UsageError(f"recipe {path}: '{key}' must be a path")
    if not isinstance(data.get("steps"), list) or not data["steps"]:
        raise UsageError(f"recipe {path}: 'steps' must be a non-empty list of stage mappings")
    if not isinstance(data.get("common") or {}, dict):
        raise UsageError(f"recipe {path}: 'common' must be a mapping of flags")
    scratch = data.get("scratch_tokens")
    if scratch is not None and (not isinstance(scratch, int) or isinstance(scratch, bool)
                                or scratch < 1):
        raise UsageError(f"recipe {path}: scratch_tokens {scratch!r} must be a positive integer "
                         "written out (94000000000, not 94e9)")


def _step_header(index: int, raw: Any, names: set) -> tuple:
    """(stage, name) of one raw step; checks the stage and the name."""
    if not isinstance(raw, dict):
        raise UsageError(f"step {index + 1} must be a mapping with a 'stage' key")
    stage = raw.get("stage")
    if stage not in STAGE_COMMANDS:
        raise UsageError(f"step {index + 1}: unknown stage {stage!r}; use one of "
                         f"{', '.join(STAGE_COMMANDS)}")
    name = str(raw.get("name", stage))
    if not name or "/" in name or name.startswith(".") or name == "teacher":
        raise UsageError(f"step {index + 1}: name {name!r} must be a plain file name other than "
                         "'teacher'")
    if name in names:
        raise UsageError(f"step name {name!r} is used twice; give one of the {stage} steps "
                         "another 'name'")
    return stage, name


def load_recipe(path: str) -> Recipe:
    """Reads and validates a recipe; every step's argv is parsed by its command's parser."""
    data = read_recipe_file(path)
    _check_top_level(path, data)
    workdir = os.path.expanduser(data["workdir"])
    teacher = os.path.expanduser(data["teacher"])
    common = {str(k): v for k, v in (data.get("common") or {}).items()}
    for key in RUNNER_KEYS:
        if key in common:
            raise UsageError(f"common: '{key}' is set by the runner (WORKDIR/NAME); remove it")
    headers, names = [], set()
    for index, raw in enumerate(data["steps"]):
        headers.append(_step_header(index, raw, names))
        names.add(headers[-1][1])
    outputs = {"teacher": teacher}
    steps, used_common = [], set()
    for index, (raw, (stage, name)) in enumerate(zip(data["steps"], headers)):
        later = {n for _, n in headers[index + 1:]}
        step = _build_step(stage, name, raw, common, workdir, outputs, later, used_common)
        parse_step(step)
        outputs[name] = step.output
        steps.append(step)
    unused = sorted(set(common) - used_common)
    if unused:
        raise UsageError(f"common: {', '.join(unused)} is a flag of no step's command; fix the "
                         "spelling or remove it")
    return Recipe(name=str(data.get("name", os.path.splitext(os.path.basename(path))[0])),
                  workdir=workdir, teacher=teacher, steps=steps,
                  scratch_tokens=data.get("scratch_tokens"))


def _build_step(stage, name, raw, common, workdir, outputs, later, used_common) -> Step:
    command = STAGE_COMMANDS[stage]
    flags = command_flags(command)
    own = {str(k): v for k, v in raw.items() if k not in ("stage", "name")}
    for key in RUNNER_KEYS:
        if key in own:
            path = os.path.join(workdir, OUTPUTS[stage][0].format(name))
            raise UsageError(f"step {name}: '{key}' is set by the runner ({path}); remove it")
    for key, value in own.items():
        words = _flag_words(key, value if value is not None else "x")
        if words[0] not in flags:
            raise UsageError(f"step {name}: {key!r} is not a flag of minitron {command} (no "
                             f"{words[0]}); see `minitron {command} --help`")
    merged = {}
    for key, value in common.items():
        words = _flag_words(key, value if value is not None else "x")
        if words[0] in flags:
            merged[key] = value
            used_common.add(key)
    merged.update(own)
    if stage in TRAINING:
        merged.setdefault("resume", "auto")
    output, reference = OUTPUTS[stage]
    merged["json" if stage == "eval" else "output"] = os.path.join(workdir, output.format(name))
    refs: List[str] = []
    argv: List[str] = []
    for key, value in merged.items():
        argv += _flag_words(key, _resolve(name, key, value, outputs, later, refs))
    return Step(stage=stage, name=name, argv=argv,
                output=os.path.join(workdir, reference.format(name)), refs=refs)


def select_steps(recipe: Recipe, only: Optional[str] = None,
                 start: Optional[str] = None) -> List[Step]:
    """The steps ``--only NAME[,NAME]`` / ``--from NAME`` keep (all by default)."""
    names = [step.name for step in recipe.steps]
    wanted = [n for n in (only or "").split(",") if n]
    for name in wanted + ([start] if start else []):
        if name not in names:
            raise UsageError(f"step {name!r} is not in the recipe; choose from {', '.join(names)}")
    first = names.index(start) if start else 0
    return [step for index, step in enumerate(recipe.steps)
            if index >= first and (not wanted or step.name in wanted)]


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def step_done(step: Step) -> bool:
    """True when the step's output exists (a checkpoint with its config, or the file)."""
    if step.stage in ("importance", "eval"):
        return os.path.isfile(step.output)
    return is_checkpoint(step.output)


def check_inputs(recipe: Recipe, steps: List[Step]) -> None:
    """Before a real run: every input a step to run reads but no earlier selected step makes
    must exist."""
    by_name = {step.name: step for step in recipe.steps}
    made = set()
    for step in steps:
        if step_done(step):
            made.add(step.name)
            continue
        for ref in step.refs:
            if ref in made:
                continue
            if ref == "teacher" and not is_checkpoint(recipe.teacher):
                raise UsageError(f"teacher {recipe.teacher} is not a checkpoint (no "
                                 f"{CONFIG_FILE}); make it with `minitron import-hf ... "
                                 f"--output {recipe.teacher}`")
            if ref != "teacher" and not step_done(by_name[ref]):
                raise UsageError(f"step {step.name} reads @{ref} ({by_name[ref].output}), which "
                                 f"does not exist yet; run step {ref} too")
        made.add(step.name)


# ----------------------------------------------------------------------------- cost

def checkpoint_info(path: str) -> Optional[Dict[str, Any]]:
    """``minitron_config.json`` of a checkpoint (model config and meta), or None."""
    return read_json(os.path.join(path, CONFIG_FILE)) if is_checkpoint(path) else None


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
    teacher = models.params(args.teacher or args.load)
    report = read_json(os.path.join(os.path.dirname(step.output), "search.json"))
    if report is not None:
        runs = [(c["params"], int(c.get("retrain_tokens") or 0))
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
        candidates, _ = enumerate_candidates(source, load_space(args.space, source),
                                             parse_params(args.params), args.tolerance,
                                             args.tp, args.pp)
        if not args.retrain:
            return [(c.params, 0) for c in candidates]
        config = TrainConfig.from_args(args, train_tokens=args.retrain_tokens)
        tokens = config.train_steps() * config.global_batch_size * config.seq_length
    except (UsageError, ValueError, TypeError):
        return None
    return [(c.params, tokens) for c in candidates]


def step_cost(step: Step, models: _Models) -> Dict[str, Any]:
    """Tokens and FLOPs of one step (see the module docstring); records planned model configs."""
    args = parse_step(step)
    row: Dict[str, Any] = {"name": step.name, "stage": step.stage, "done": step_done(step),
                           "params": None, "teacher_params": None, "tokens": None, "flops": None}
    if step.stage in TRAINING:
        models.planned[step.output] = models.config(args.student)
        row["params"] = models.params(args.student)
        row["teacher_params"] = models.params(getattr(args, "teacher", None))
        row["tokens"], row["measured"] = _training_tokens(step, args)
        teacher = row["teacher_params"] or 0
        if row["params"] is not None and row["tokens"] is not None:
            row["flops"] = (6 * row["params"] + 2 * teacher) * row["tokens"]
    elif step.stage == "prune":
        models.planned[step.output] = _pruned_config(args, models.config(args.load))
        row.update(params=models.params(step.output), tokens=0, flops=0)
    elif step.stage == "search":
        row["params"] = models.params(step.output)
        row["teacher_params"] = models.params(args.teacher or args.load)
        row["tokens"], row["flops"], row["measured"] = _search_cost(step, args, models)
    else:
        cfg = models.config(args.load)
        row["params"] = count_parameters(cfg)["total"] if cfg is not None else None
        if step.stage == "importance":
            row["tokens"] = _importance_tokens(args, cfg)
        else:
            row["tokens"], row["measured"] = _eval_tokens(step, args)
        if row["params"] is not None and row["tokens"] is not None:
            row["flops"] = 2 * row["params"] * row["tokens"]
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
            model["scratch_flops"] = 6 * params * scratch
            model["ratio"] = (model["scratch_flops"] / model["flops"]) if model["flops"] else None
        produced.append(model)
    total = {"tokens": _sum(r["tokens"] for r in rows), "flops": _sum(flops.values()),
             "teacher_params": teacher_params, "scratch_tokens": scratch}
    scratch_models = _sum(m.get("scratch_flops") for m in produced) if scratch else None
    if scratch_models is not None and total["flops"]:
        total.update(scratch_flops_models=scratch_models,
                     ratio_models=scratch_models / total["flops"])
        if teacher_params is not None:
            pretrain = 6 * teacher_params * scratch
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


def _fmt(value, kind: str = "int") -> str:
    if value is None:
        return "?"
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
                     f"{_fmt(row['teacher_params'])} | {_fmt(row['tokens'])} | "
                     f"{_fmt(row['flops'], 'flops')} | {status} |")
    lines += ["", "| model | N | trained tokens | FLOPs (with its ancestors) | from scratch | "
              "scratch ÷ ours |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for model in cost["models"]:
        lines.append(f"| {model['name']} | {_fmt(model['params'])} | {_fmt(model['tokens'])} | "
                     f"{_fmt(model['flops'], 'flops')} | "
                     f"{_fmt(model.get('scratch_flops'), 'flops')} | "
                     f"{_fmt(model.get('ratio'), 'ratio')} |")
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
    lines += ["", f"Formula: {cost['formula']}"]
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
