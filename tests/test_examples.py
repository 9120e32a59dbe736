"""Examples: every recipe step is a valid CLI call, the recipes reach the papers' architectures,
and the example scripts' dry runs print the commands of each stage at the documented layouts."""

import os
from pathlib import Path

import pytest

from test_launch import ROOT, commands, option, run_script, split_torchrun

EXAMPLES = ROOT / "examples"
RECIPES = sorted(EXAMPLES.rglob("*recipe.yaml")) + [EXAMPLES / "smollm2_cpu.yaml",
                                                    EXAMPLES / "smollm2_quarter_cpu.yaml"]
COMMAND_OF = {"teacher_correction": "correct-teacher", "importance": "importance",
              "prune": "prune", "search": "search", "distill": "distill", "train": "train",
              "eval": "eval"}
# what "@NAME" means for each stage (examples/README.md)
OUTPUT_OF = {"teacher_correction": ("{}", "{}/final"), "distill": ("{}", "{}/final"),
             "train": ("{}", "{}/final"),
             "importance": ("{}.pt", "{}.pt"), "prune": ("{}", "{}"), "search": ("{}", "{}/best"),
             "eval": ("{}.json", "{}.json")}


def cli_parser(command):
    """The argparse subparser of ``minitron COMMAND`` (None when the command does not exist)."""
    from megatron_minitron import cli

    if command not in cli.COMMANDS:
        return None
    parser = cli.build_parser(only=command)
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices[command]


def recipe_argvs(recipe):
    """(stage, name, argv) per step, from the package's recipe parser (examples/README.md)."""
    import yaml

    from megatron_minitron.recipe import load_recipe

    data = yaml.safe_load(recipe.read_text())
    parsed = load_recipe(str(recipe))
    found = []
    for step in parsed.steps:
        output, reference = OUTPUT_OF[step.stage]
        flag = "--json" if step.stage == "eval" else "--output"
        assert step.argv[step.argv.index(flag) + 1] == os.path.join(data["workdir"],
                                                                    output.format(step.name))
        assert step.output == os.path.join(data["workdir"], reference.format(step.name))
        found.append((step.stage, step.name, step.argv))
    return data, found


def parse_cli(command, argv):
    parser = cli_parser(command)
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"minitron {command} rejects {argv}")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_recipe_steps_are_valid_cli_calls(recipe):
    data, steps = recipe_argvs(recipe)
    assert {"name", "workdir", "teacher", "steps"} <= set(data)
    assert [stage for stage, _, _ in steps][-1] == "eval"
    for stage, name, argv in steps:
        args = parse_cli(COMMAND_OF[stage], argv)
        if stage in ("distill", "teacher_correction"):
            assert args.train_tokens > 0 and args.resume in (None, "auto")


def test_recipe_stages_match_the_schema():
    from megatron_minitron.recipe import OUTPUTS, STAGE_COMMANDS

    assert STAGE_COMMANDS == COMMAND_OF and OUTPUTS == OUTPUT_OF


def _apply_target(cfg, argv):
    target = argv[argv.index("--target") + 1]
    changes = {key: int(value) for key, value in (item.split("=") for item in target.split(","))}
    return cfg.replace(**changes)


def test_recipes_reach_the_papers_architectures():
    from test_scaling import plan

    models = plan.MODELS
    _, llama = recipe_argvs(EXAMPLES / "llama31_8b" / "recipe.yaml")
    prunes = {name: argv for stage, name, argv in llama if stage == "prune"}
    assert _apply_target(models["Llama-3.1-8B"], prunes["prune_width"]) == \
        models["Llama-3.1-Minitron-4B-Width"]
    assert _apply_target(models["Llama-3.1-8B"], prunes["prune_depth"]) == \
        models["Llama-3.1-Minitron-4B-Depth"]
    _, nemotron = recipe_argvs(EXAMPLES / "nemotron4_15b" / "recipe.yaml")
    steps = {name: argv for _, name, argv in nemotron}
    eight = _apply_target(models["Nemotron-4-15B"], steps["prune_8b"])
    assert eight == models["Minitron-8B"]
    assert _apply_target(eight, steps["prune_4b"]) == models["Minitron-4B"]
    assert steps["prune_4b"][steps["prune_4b"].index("--load") + 1].endswith("distill_8b/final")
    for name in ("distill_8b", "distill_4b"):  # both from the corrected 15B teacher, 94B tokens
        argv = steps[name]
        assert argv[argv.index("--teacher") + 1].endswith("teacher_correction/final")
        assert argv[argv.index("--train-tokens") + 1] == "94000000000"
    _, qwen = recipe_argvs(EXAMPLES / "qwen3_30b_a3b" / "recipe.yaml")
    steps = {name: argv for _, name, argv in qwen}
    assert _apply_target(models["Qwen3-30B-A3B"], steps["prune_experts"]) == \
        models["Qwen3-30B-A3B-88E"]
    for name in ("teacher_correction", "distill_experts"):  # the layouts of docs/SCALING.md
        argv = steps[name]
        assert argv[argv.index("--ep") + 1] == "8" and argv[argv.index("--tp") + 1] == "1"


def _torchrun_stage_args(printed):
    launcher, stage, args = split_torchrun(printed)
    return option(launcher, "--nproc-per-node"), stage, args


def test_llama_example_dry_run():
    printed = commands(run_script(EXAMPLES / "llama31_8b" / "run.sh").stdout)
    singles = [p for p in printed if p[0] == "minitron"]
    assert [p[1] for p in singles] == ["import-hf", "preprocess-data", "preprocess-data"]
    launched = [_torchrun_stage_args(p) for p in printed if p[0] == "torchrun"]
    assert [(n, s) for n, s, _ in launched] == [
        ("8", "correct-teacher"), ("8", "importance"), ("1", "prune"), ("1", "prune"),
        ("8", "distill"), ("8", "distill"), ("8", "eval"), ("8", "eval"), ("8", "eval")]
    for nproc, stage, args in launched:
        parsed = parse_cli(stage, args)
        expected_tp = 2 if stage == "correct-teacher" else 1  # docs/SCALING.md, one node
        assert parsed.tp == expected_tp and parsed.pp == 1
    targets = [option(args, "--target") for _, stage, args in launched if stage == "prune"]
    assert targets == ["hidden_size=3072,ffn_hidden_size=9216,num_attention_heads=32,"
                       "num_query_groups=8", "num_layers=16"]
    skipped = run_script(EXAMPLES / "llama31_8b" / "run.sh", CORRECTION_TOKENS=0).stdout
    assert "correct-teacher" not in skipped and "--teacher runs/llama31_8b/teacher " in skipped
    distills = [parse_cli(s, a) for _, s, a in launched if s == "distill"]
    assert [d.output_format for d in distills] == ["megatron", "megatron"]


def test_llama_example_starts_from_a_megatron_lm_checkpoint():
    printed = commands(run_script(EXAMPLES / "llama31_8b" / "run.sh", CORRECTION_TOKENS=0,
                                  MEGATRON_LOAD="/ckpt/llama", TOKENIZER="/models/tok").stdout)
    assert [p[1] for p in printed if p[0] == "minitron"] == ["preprocess-data"] * 2
    for words in printed:
        if words[0] == "minitron":
            assert option(words, "--tokenizer") == "/models/tok"
            continue
        _, stage, args = _torchrun_stage_args(words)
        parsed = parse_cli(stage, args)
        assert parsed.tokenizer == "/models/tok", stage
        if stage in ("importance", "prune"):
            assert parsed.load == "/ckpt/llama"
        if stage == "distill":
            assert parsed.teacher == "/ckpt/llama"


def test_nemotron_example_dry_run_chains_sbatch_jobs():
    printed = commands(run_script(EXAMPLES / "nemotron4_15b" / "run.sh", SEGMENTS=2).stdout)
    assert len(printed) == 12  # 2 correction + 2 x (importance, prune, 2 distill) + 2 eval
    scripts = []
    for index, words in enumerate(printed):
        assert words[0] == "env"
        sbatch = words.index("sbatch")
        assignments = dict(word.split("=", 1) for word in words[1:sbatch])
        options = [w for w in words[sbatch + 1:] if w.startswith("--")]
        script = next(w for w in words if w.startswith("launch/slurm/"))
        scripts.append(Path(script).stem)
        nodes = int(next(o for o in options if o.startswith("--nodes=")).split("=")[1])
        assert nodes == (16 if scripts[-1] in ("correct_teacher", "distill") else 1)
        if index:
            dependency = next(o for o in options if o.startswith("--dependency="))
            resume = scripts[-1] == scripts[-2] and scripts[-1] in ("correct_teacher", "distill")
            assert dependency == f"--dependency={'afterany' if resume else 'afterok'}:JOB{index}"
        # what node 0 would run for this job, parsed by the real CLI
        stage_args = words[words.index(script) + 1:]
        env = dict(assignments, SLURM_JOB_NODELIST=f"dgx[001-{nodes:03d}]", SLURM_JOB_ID=index)
        srun, torchrun = commands(run_script(ROOT / script, *stage_args, **env).stdout)
        _, stage, args = split_torchrun(torchrun)
        assert option(split_torchrun(torchrun)[0], "--nnodes") == str(nodes)
        parse_cli(stage, args)
    assert scripts == ["correct_teacher", "correct_teacher", "importance", "prune", "distill",
                       "distill", "importance", "prune", "distill", "distill", "eval", "eval"]
