#!/usr/bin/env bash
# A small Qwen3-shaped model (q/k norms, explicit head_dim 32, 8 heads in 2 query groups, 4 layers,
# hidden 256, tied embeddings, SmolLM2's tokenizer), trained briefly from scratch on Linux-doc,
# with its importance scores: the second family of bench/head_add_back.py.
#   bash bench/qwen3_shaped.sh            (WORK=outputs/qwen3_shaped; needs outputs of
#                                          `python -m megatron_minitron.assets smollm2 linux_doc`
#                                          and TEACHER, a SmolLM2 checkpoint for its tokenizer)
# Then:
#   python bench/head_add_back.py --load $WORK/trained/final --scores $WORK/scores.pt \
#     --target num_attention_heads=4,num_query_groups=2 \
#     --text-file ~/.cache/megatron_minitron/linux-doc-6.1/admin-guide \
#     --eval-text-file ~/.cache/megatron_minitron/linux-doc-6.1/filesystems --eval-samples 16 \
#     --train-tokens 16384 --global-batch-size 8 --seeds 3 --precision bf16 \
#     --name qwen3_shaped --work $WORK/head_add_back
set -euo pipefail

WORK=${WORK:-outputs/qwen3_shaped}
TEACHER=${TEACHER:-outputs/smollm2/teacher}
DOCS=$(python -c "from megatron_minitron import assets; print(assets.asset_root())")/linux-doc-6.1
mkdir -p "$WORK"
if [ ! -f "$WORK/init/minitron_config.json" ]; then
  python - "$WORK/hf" "$TEACHER/tokenizer" <<'PY'
import sys

import torch
import transformers

out, tokenizer = sys.argv[1:]
torch.manual_seed(0)
config = transformers.Qwen3Config(vocab_size=49152, hidden_size=256, intermediate_size=768,
                                  num_hidden_layers=4, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                  max_position_embeddings=1024, rope_theta=1e6)
transformers.Qwen3ForCausalLM(config).save_pretrained(out)
transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
PY
  minitron import-hf --hf-path "$WORK/hf" --output "$WORK/init"
fi
minitron train --student "$WORK/init" --text-file "$DOCS/admin-guide" --seq-length 256 \
  --train-tokens 393216 --global-batch-size 16 --micro-batch-size 8 --lr 2e-3 --min-lr 2e-4 \
  --lr-warmup-steps 4 --log-interval 12 --precision bf16 --ce-only --resume auto \
  --output "$WORK/trained"
if [ ! -f "$WORK/scores.pt" ]; then
  minitron importance --load "$WORK/trained/final" --text-file "$DOCS/admin-guide" \
    --num-samples 64 --seq-length 256 --no-depth --no-plot --output "$WORK/scores.pt"
fi
