"""The recipe of scripts/results.py: the runs compared on docs/RESULTS.md (importance, width
and depth pruning, teacher correction, search, retraining, evaluation), the imported teacher and
the random-init student, written as one ``minitron run`` recipe."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH = {"hidden_size": 384, "ffn_hidden_size": 1024, "num_attention_heads": 6,
         "num_query_groups": 3}
DEPTH = {"num_layers": 11}  # 67.25M parameters, the width model has 67.56M
AGGREGATIONS = ("l2,mean", "mean,mean", "mean,l2", "l2,l2")  # batch,sequence; first = default
SEARCH_SPACE = {"num_layers": [24, 30], "hidden_size": [384, 448, 512],
                "ffn_hidden_size": [768, 1024], "num_attention_heads": [6]}
TASKS = "hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada"
# (name, student step or path, teacher, stage, label)
TRAINED = [("distill_width", "@prune_width", "@teacher", "distill", "width, distilled"),
           ("distill_width_addback", "@prune_width_addback", "@teacher", "distill",
            "width with head add-back, distilled"),
           ("distill_depth", "@prune_depth", "@teacher", "distill", "depth, distilled"),
           ("train_width_ce", "@prune_width", None, "train",
            "width, cross-entropy retraining"),
           ("distill_random_init", "random_init", "@teacher", "distill",
            "width architecture from random init, distilled"),
           ("distill_width_corrected", "@prune_width_corrected", "@teacher_correction",
            "distill", "width pruned from and distilled by the corrected teacher")]


def _agg_name(aggregation: str) -> str:
    return "importance" if aggregation == AGGREGATIONS[0] else \
        "importance_" + aggregation.replace(",", "_")


def build_recipe(work: str, teacher: str, docs: str, args) -> dict:
    train_text = [os.path.join(docs, "admin-guide")]
    held_out = [os.path.join(docs, "filesystems")]
    training = dict(text_file=train_text, train_tokens=args.tokens, global_batch_size=4,
                    micro_batch_size=4, lr=3.0e-4, min_lr=3.0e-5, lr_warmup_steps=1,
                    log_interval=1)
    steps = []
    for aggregation in AGGREGATIONS:
        step = dict(stage="importance", name=_agg_name(aggregation), load="@teacher",
                    text_file=train_text, num_samples=args.calib_samples,
                    aggregation=aggregation)
        if aggregation == AGGREGATIONS[0]:
            step["depth_samples"] = args.depth_samples
        else:
            step["depth"] = False
        steps.append(step)
    steps += [dict(stage="prune", name="prune_width", load="@teacher", scores="@importance",
                   target=WIDTH, head_add_back=False),
              dict(stage="prune", name="prune_width_addback", load="@teacher",
                   scores="@importance", target=WIDTH, head_add_back="output"),
              dict(stage="prune", name="prune_depth", load="@teacher", scores="@importance",
                   target=DEPTH, depth_metric="ppl")]
    for aggregation in AGGREGATIONS[1:]:
        steps.append(dict(stage="prune", name="prune_width_" + aggregation.replace(",", "_"),
                          load="@teacher", scores="@" + _agg_name(aggregation), target=WIDTH,
                          head_add_back=False))
    steps += [dict(stage="teacher_correction", load="@teacher", **training),
              dict(stage="importance", name="importance_corrected", load="@teacher_correction",
                   text_file=train_text, num_samples=args.calib_samples, depth=False),
              dict(stage="prune", name="prune_width_corrected", load="@teacher_correction",
                   scores="@importance_corrected", target=WIDTH, head_add_back=False)]
    for name, student, teacher_ref, stage, _ in TRAINED:
        step = dict(stage=stage, name=name, student=student, **training)
        if teacher_ref:
            step["teacher"] = teacher_ref
        else:
            step["ce_only"] = True
        steps.append(step)
    steps.append(dict(stage="search", load="@teacher", scores="@importance",
                      params=str(args.search_params), tolerance=0.05,
                      space=os.path.join(work, "search_space.yaml"),
                      retrain_tokens=args.search_tokens, text_file=train_text,
                      global_batch_size=4, micro_batch_size=4, lr=3.0e-4, min_lr=3.0e-5,
                      lr_warmup_steps=1, eval_samples=16, head_add_back=False))
    evaluated = ["teacher", "teacher_correction", "prune_width", "prune_width_addback",
                 "prune_depth", "random_init"] + \
        ["prune_width_" + a.replace(",", "_") for a in AGGREGATIONS[1:]] + \
        [name for name, *_ in TRAINED]
    with_tasks = {"teacher", "prune_width", "prune_depth"} | {name for name, *_ in TRAINED}
    for name in evaluated:
        load = "random_init" if name == "random_init" else f"@{name}"
        step = dict(stage="eval", name=f"eval_{name}", load=load, text_file=held_out,
                    num_samples=args.eval_samples)
        if name in with_tasks and args.limit:
            step.update(tasks=TASKS, limit=args.limit)
        steps.append(step)
    for step in steps:  # paths that are not references are resolved against WORK
        for key in ("student", "load"):
            if step.get(key) == "random_init":
                step[key] = os.path.join(work, "random_init")
    return {"name": "results_smollm2", "workdir": work, "teacher": teacher,
            "common": {"seq_length": args.seq_length, "micro_batch_size": 4}, "steps": steps}


def prepare(work: str, args):
    """Assets, the imported teacher, the random-init student and the recipe file."""
    import yaml

    from megatron_minitron import assets

    os.makedirs(work, exist_ok=True)
    docs = assets.linux_doc()
    model_dir, gguf = assets.smollm2()
    teacher = os.path.join(work, "teacher")
    if not os.path.isfile(os.path.join(teacher, "minitron_config.json")):
        _minitron("import-hf", "--hf-path", model_dir, "--gguf-file", gguf, "--output", teacher)
    random_init = os.path.join(work, "random_init")
    if not os.path.isfile(os.path.join(random_init, "minitron_config.json")):
        _minitron_python("scripts/results.py", "--make-random-init", teacher, random_init)
    with open(os.path.join(work, "search_space.yaml"), "w") as handle:
        yaml.safe_dump(SEARCH_SPACE, handle, default_flow_style=None)
    recipe = build_recipe(work, teacher, docs, args)
    path = os.path.join(work, "recipe.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False, default_flow_style=None)
    return path


def make_random_init(teacher: str, output: str) -> None:
    """The width architecture with freshly initialised weights (mcore's init, seed 1234)."""
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint.io import load_config, save_checkpoint
    from megatron_minitron.prune.plan import target_config

    cfg = target_config(load_config(teacher), WIDTH)
    with parallel.parallel_context(1, 1, seed=1234):
        save_checkpoint(adapter.build_gpt_model(cfg), cfg, output, tokenizer_from=teacher,
                        meta={"random_init": True})


def _minitron(*argv):
    subprocess.run([sys.executable, "-m", "megatron_minitron", *argv], check=True, cwd=ROOT)


def _minitron_python(*argv):
    subprocess.run([sys.executable, *argv], check=True, cwd=ROOT)
