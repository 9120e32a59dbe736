"""``minitron run``: a whole recipe (teacher correction → importance → search or prune → distill
→ eval) from one YAML file, under the same processes.

    minitron run examples/smollm2_cpu.yaml
    minitron run RECIPE.yaml --dry-run            # each step's command line, skipped or not
    minitron run RECIPE.yaml --only prune,distill  # or --from distill
    torchrun --nproc-per-node 8 -m megatron_minitron run RECIPE.yaml

The whole recipe is validated first (schema in examples/README.md). Each step runs in this
process through its command's own parser and ``main``; a step whose output exists is skipped,
so a re-run continues where the last one stopped (training steps resume mid-run). At the end
WORKDIR/cost.json and WORKDIR/cost.md hold tokens and FLOPs per step and per produced model
(:mod:`megatron_minitron.cost`); a dry run writes its planned numbers there when WORKDIR exists
and creates nothing otherwise.

On a terminal a live bar shows the recipe's step i/n and the running step's name, with each
stage's own bar beneath it (:mod:`megatron_minitron.progress`; ``MINITRON_PROGRESS=1`` forces the
bars under a pipe, ``0`` turns them off).
"""

from __future__ import annotations

import os
import time
from typing import Dict

from megatron_minitron import progress
from megatron_minitron.errors import UsageError
from megatron_minitron.files import read_json
from megatron_minitron.cost import format_cost, recipe_cost, write_cost
from megatron_minitron.recipe import (
    Step,
    check_inputs,
    load_recipe,
    parse_step,
    select_steps,
    step_done,
)


def add_arguments(parser, name):
    parser.add_argument("recipe", help="recipe YAML file (schema: examples/README.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print each step's command line and whether it would be skipped, "
                             "and the planned cost; run nothing")
    parser.add_argument("--only", help="comma-separated step names to run (others are skipped)")
    parser.add_argument("--from", dest="start", help="start at this step (earlier ones skipped)")


def _launch_rank0() -> bool:
    """Rank 0 of the launch (before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def _say(line: str) -> None:
    from megatron_minitron import parallel

    if parallel.is_rank0():
        progress.write(line)


def validate_steps(recipe, steps) -> None:
    """Runs every selected step's own checks (those its command runs before any heavy work)
    before the first step starts, with the model configs earlier steps will make: a bad value
    in the last step fails at once, not after an hour of earlier steps."""
    from megatron_minitron import cli
    from megatron_minitron.cost import planned_models

    models = planned_models(recipe)
    for step in steps:
        if step_done(step):
            continue
        validate = getattr(cli._command_module(step.command), "validate", None)
        if validate is None:
            continue
        try:
            validate(parse_step(step), models.config)
        except UsageError as err:
            raise UsageError(f"step {step.name} (minitron {step.command}): {err}") from None


def dry_run(recipe, steps) -> None:
    for step in steps:
        state = "skip (output exists)" if step_done(step) else "run"
        print(f"# step {step.name} ({step.stage}): {state}")
        print(step.command_line())
    cost = recipe_cost(recipe)
    if os.path.isdir(recipe.workdir):  # a dry run creates no folders
        print(write_cost(cost, recipe.workdir))
    else:
        print(format_cost(cost))
        print(f"# {recipe.workdir} does not exist yet: cost.json/cost.md not written")


def run_step(step: Step) -> float:
    """Runs one stage in this process (every rank); returns its seconds."""
    from megatron_minitron import cli, parallel
    from megatron_minitron.checkpoint.io import resolve_load_args

    args = parse_step(step)
    _say(f"== step {step.name}: {step.command_line()}")
    started = time.perf_counter()
    try:
        resolve_load_args(args)
        code = cli._command_module(step.command).main(args)
    except UsageError as err:  # bad input: name the step (other errors keep their traceback)
        raise UsageError(f"step {step.name} (minitron {step.command}): {err}") from None
    if code:
        raise UsageError(f"step {step.name}: minitron {step.command} exited with {code}")
    parallel.barrier()
    seconds = time.perf_counter() - started
    _say(f"== step {step.name}: done in {seconds:.1f} s")
    return seconds


def recorded_seconds(recipe) -> Dict[str, float]:
    """Step seconds of an earlier run of this recipe (``WORKDIR/cost.json``), for the steps a
    re-run skips, so the reports keep every step's time."""
    earlier = read_json(os.path.join(recipe.workdir, "cost.json")) or {}
    return {row["name"]: row["seconds"] for row in earlier.get("steps", [])
            if row.get("seconds") is not None and row.get("done")}


def main(args) -> int:
    from megatron_minitron import parallel

    recipe = load_recipe(args.recipe)
    steps = select_steps(recipe, args.only, args.start)
    validate_steps(recipe, steps)
    if args.dry_run:
        if _launch_rank0():
            dry_run(recipe, steps)
        return 0
    check_inputs(recipe, steps)
    seconds = recorded_seconds(recipe)
    started, this_run = time.perf_counter(), set()
    with parallel.held_process_group():
        if parallel.is_rank0():
            os.makedirs(recipe.workdir, exist_ok=True)
        parallel.barrier()
        # Steps differ in cost by orders of magnitude: no ETA from their average (each stage's
        # own bar estimates its own work).
        overall = progress.bar(total=len(steps), desc=f"recipe {recipe.name}", leave=True,
                               unit="step", bar_format="{desc}: {n_fmt}/{total_fmt} steps, "
                               "{elapsed} elapsed")
        with progress.lines_above_bars(progress.enabled()):
            for index, step in enumerate(steps, 1):
                overall.set_description(f"recipe {recipe.name} [{index}/{len(steps)} "
                                        f"{step.name}]")
                done = parallel.broadcast_object(step_done(step) if parallel.is_rank0() else None)
                if done:
                    _say(f"== step {step.name}: skipped, {step.output} exists")
                else:
                    seconds[step.name] = run_step(step)
                    this_run.add(step.name)
                overall.update()
        overall.set_description(f"recipe {recipe.name}")
        overall.close()
        if parallel.is_rank0():
            print(write_cost(recipe_cost(recipe, seconds), recipe.workdir))
            print(f"cost report: {os.path.join(recipe.workdir, 'cost.md')}")
            ran = [name for name in seconds if name in this_run]
            wall = time.perf_counter() - started
            print(f"recipe {recipe.name}: {len(ran)} step(s) run in {int(wall // 60)} min "
                  f"{wall % 60:.0f} s of wall time")
        parallel.barrier()
    return 0
