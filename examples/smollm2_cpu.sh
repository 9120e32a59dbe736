#!/usr/bin/env bash
# SmolLM2-135M on CPU: import, score, prune to about half its parameters, evaluate.
#   bash examples/smollm2_cpu.sh            (WORK=outputs/smollm2 by default)
# Environment: WORK (output folder), SAMPLES (calibration samples), SEQ (sequence length),
# DEPTH_SAMPLES (samples for the layer perplexity/BI passes), NPROC (ranks), TP, PP.
set -euo pipefail

WORK=${WORK:-outputs/smollm2}
SAMPLES=${SAMPLES:-64}
SEQ=${SEQ:-256}
DEPTH_SAMPLES=${DEPTH_SAMPLES:-16}
NPROC=${NPROC:-1}
TP=${TP:-1}
PP=${PP:-1}
mkdir -p "$WORK"

run() { torchrun --standalone --nproc-per-node "$NPROC" -m megatron_minitron "$@"; }

python -m megatron_minitron.assets smollm2 linux_doc
DOCS=$(python -c "from megatron_minitron import assets; print(assets.linux_doc())")
MODEL=$(python -c "from megatron_minitron import assets; d, f = assets.smollm2(); print(d)")

if [ ! -f "$WORK/teacher/minitron_config.json" ]; then
  minitron import-hf --hf-path "$MODEL" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
    --output "$WORK/teacher"
fi
run importance --load "$WORK/teacher" --text-file "$DOCS/admin-guide" \
  --num-samples "$SAMPLES" --seq-length "$SEQ" --micro-batch-size 4 \
  --depth-samples "$DEPTH_SAMPLES" --output "$WORK/scores.pt" --tp "$TP" --pp "$PP"
minitron prune --load "$WORK/teacher" --scores "$WORK/scores.pt" \
  --target hidden_size=384,ffn_hidden_size=1024,num_attention_heads=6,num_query_groups=3 \
  --output "$WORK/pruned"
for name in teacher pruned; do
  run eval --load "$WORK/$name" --text-file "$DOCS/filesystems" --seq-length "$SEQ" \
    --num-samples 32 --micro-batch-size 4 --json "$WORK/eval_$name.json" --tp "$TP" --pp "$PP"
done
