#!/usr/bin/env bash
# SmolLM2-135M on CPU, end to end: fetch the offline assets, import the model, then the recipe
# examples/smollm2_quarter_cpu.yaml (importance on Linux-doc admin-guide, prune a quarter of
# the parameters in depth and width, distill the pruned model from the unpruned one and the same
# architecture from random initialisation on the same tokens, evaluate all four, in bf16), then
# the before/after table and plots (python -m megatron_minitron.report).
#   bash examples/smollm2_cpu.sh            (WORK=outputs/smollm2 by default)
# Environment: WORK (output folder), SAMPLES (calibration samples), SEQ (sequence length),
# DEPTH_SAMPLES (set: also layer perplexity/BI on that many samples, a forward per layer each),
# TOKENS (distillation tokens of every distill step; default: the recipe's),
# RECIPE (default examples/smollm2_quarter_cpu.yaml; examples/smollm2_cpu.yaml prunes to half
# the parameters and distills briefly),
# LIMIT (items per zero-shot task), NPROC (ranks), TP, PP; DRY_RUN=1 prints the commands and
# the recipe's steps only. A re-run skips every finished step.
# Outputs in WORK: summary.md/.json (the table), metrics.png, distill_loss.png, importance.png,
# cost.md, recipe.yaml (the recipe as run), eval_*.json, teacher/, prune/, distill/final/.
set -euo pipefail

WORK=${WORK:-outputs/smollm2}
SAMPLES=${SAMPLES:-32}
SEQ=${SEQ:-256}
DEPTH_SAMPLES=${DEPTH_SAMPLES:-}
TOKENS=${TOKENS:-}
LIMIT=${LIMIT:-50}
NPROC=${NPROC:-1}
TP=${TP:-1}
PP=${PP:-1}
DRY_RUN=${DRY_RUN:-0}
RECIPE=${RECIPE:-$(dirname "$0")/smollm2_quarter_cpu.yaml}

do_or_print() { if [ "$DRY_RUN" = 1 ]; then echo "$*"; else "$@"; fi; }

start=$SECONDS
do_or_print python -m megatron_minitron.assets smollm2 linux_doc eval_sets
ASSETS=$(python -c "from megatron_minitron import assets; print(assets.asset_root())")
MODEL=$ASSETS/smollm2-135m

if [ "$DRY_RUN" = 1 ]; then
  RUN_RECIPE=$(mktemp --suffix .yaml)
else
  mkdir -p "$WORK"
  RUN_RECIPE=$WORK/recipe.yaml
fi
if [ ! -f "$WORK/teacher/minitron_config.json" ]; then
  do_or_print minitron import-hf --hf-path "$MODEL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
    --output "$WORK/teacher"
fi

# The recipe as run: WORK, the asset folder and the settings above filled in.
WORK="$WORK" ASSETS="$ASSETS" SAMPLES="$SAMPLES" SEQ="$SEQ" DEPTH_SAMPLES="$DEPTH_SAMPLES" \
TOKENS="$TOKENS" LIMIT="$LIMIT" TP="$TP" PP="$PP" python - "$RECIPE" "$RUN_RECIPE" <<'EOF'
import os, sys, yaml

source, target = sys.argv[1:]
env = os.environ
data = yaml.safe_load(open(source))
data.update(workdir=env["WORK"], teacher=os.path.join(env["WORK"], "teacher"))
data["common"].update(seq_length=int(env["SEQ"]))
if (env["TP"], env["PP"]) != ("1", "1"):
    data["common"].update(tp=int(env["TP"]), pp=int(env["PP"]))
settings = {"importance": {"num_samples": "SAMPLES"}, "distill": {"train_tokens": "TOKENS"},
            "eval": {"limit": "LIMIT"}}
for step in data["steps"]:
    if step["stage"] == "importance" and env["DEPTH_SAMPLES"]:
        step.pop("depth", None)
        step["depth_samples"] = int(env["DEPTH_SAMPLES"])
    for key, name in settings.get(step["stage"], {}).items():
        if env[name]:
            step[key] = int(env[name])
    if "text_file" in step:
        step["text_file"] = [path.replace("~/.cache/megatron_minitron", env["ASSETS"])
                             for path in step["text_file"]]
with open(target, "w") as handle:
    yaml.safe_dump(data, handle, sort_keys=False)
EOF

if [ "$DRY_RUN" = 1 ]; then
  minitron run "$RUN_RECIPE" --dry-run
  rm -f "$RUN_RECIPE"
  exit 0
fi
torchrun --standalone --nproc-per-node "$NPROC" -m megatron_minitron run "$RUN_RECIPE"
python -m megatron_minitron.report "$RUN_RECIPE"
echo "wall time: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
