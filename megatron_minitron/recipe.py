"""Recipes: one YAML file chaining teacher correction, importance, search or prune, distillation
and evaluation (``minitron run RECIPE.yaml``; schema in examples/README.md).

    recipe = load_recipe("examples/smollm2_cpu.yaml")  # validated; UsageError on a bad value
    for step in recipe.steps:
        print(step.command_line(), step_done(step))

Every step's command line is parsed by the real ``minitron`` parser when the recipe loads, so a
bad key or value fails before any stage runs.

The cost report of a recipe is in :mod:`megatron_minitron.cost`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
        check_step_settings(step, parse_step(step))
        outputs[name] = step.output
        steps.append(step)
    unused = sorted(set(common) - used_common)
    if unused:
        raise UsageError(f"common: {', '.join(unused)} is a flag of no step's command; fix the "
                         "spelling or remove it")
    return Recipe(name=str(data.get("name", os.path.splitext(os.path.basename(path))[0])),
                  workdir=workdir, teacher=teacher, steps=steps,
                  scratch_tokens=data.get("scratch_tokens"))


def check_step_settings(step: Step, args: argparse.Namespace) -> None:
    """The value checks a training step's command makes first (TrainConfig's, GPU features
    included), run when the recipe is read so that no earlier step's work is wasted."""
    if step.command not in ("correct-teacher", "distill", "train", "search"):
        return
    from megatron_minitron.distill.config import TrainConfig

    try:
        TrainConfig.from_args(args)
    except UsageError as err:
        raise UsageError(f"step {step.name} (minitron {step.command}): {err}") from None


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
    """A checkpoint of ours (either output format); for a recipe's teacher also a Megatron-LM
    torch_dist checkpoint (see :func:`checkpoint_info`)."""
    return os.path.isfile(os.path.join(_model_folder(path), CONFIG_FILE))


def _model_folder(path: str) -> str:
    from megatron_minitron.checkpoint import megatron_lm

    return megatron_lm.resolve(path, strict=False)


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
            if ref == "teacher" and checkpoint_info(recipe.teacher) is None:
                raise UsageError(f"teacher {recipe.teacher} is not a checkpoint (no "
                                 f"{CONFIG_FILE}, not a Megatron-LM checkpoint); make it with "
                                 f"`minitron import-hf ... --output {recipe.teacher}`")
            if ref != "teacher" and not step_done(by_name[ref]):
                raise UsageError(f"step {step.name} reads @{ref} ({by_name[ref].output}), which "
                                 f"does not exist yet; run step {ref} too")
        made.add(step.name)


def checkpoint_info(path: str) -> Optional[Dict[str, Any]]:
    """``minitron_config.json`` of a checkpoint (model config and meta) — for a Megatron-LM
    checkpoint the same built from its saved args — or None."""
    from megatron_minitron.checkpoint import megatron_lm

    folder = _model_folder(path)
    if megatron_lm.is_megatron_lm(folder):
        try:
            return megatron_lm.checkpoint_info(folder, path)
        except UsageError:
            return None
    return read_json(os.path.join(folder, CONFIG_FILE)) if is_checkpoint(path) else None
