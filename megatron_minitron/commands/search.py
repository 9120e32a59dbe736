"""``minitron search``: rank the architectures of a space inside a parameter budget.

    minitron search --load CKPT --scores scores.pt --params 70M --tolerance 0.05 \
        --space space.yaml --retrain-tokens 2000000 --text-file docs/ --seq-length 256 \
        --global-batch-size 16 --micro-batch-size 4 --lr 1e-4 --output runs/search
    torchrun --nproc-per-node 8 -m megatron_minitron search ... --tp 4       # every rank

``--active-params 3B`` instead of ``--params`` budgets the parameters one token passes through
(mixture-of-experts models; their space may list num_moe_experts, moe_ffn_hidden_size and
moe_shared_expert_intermediate_size).

Every candidate is pruned from the cached scores, retrained briefly by distillation from
``--teacher`` (default ``--load``) and ranked by validation LM loss; ``--no-retrain`` ranks by
the zero-shot loss. ``OUTPUT/best`` is the selected checkpoint; ``search.csv``, ``search.md``
and ``search.png`` hold the ranking. Retraining flags are those of ``minitron distill``.
"""

from __future__ import annotations

from megatron_minitron import parallel
from megatron_minitron.cli import add_layout_arguments
from megatron_minitron.commands.common import add_head_add_back_arguments
from megatron_minitron.distill.config import TrainConfig, add_config_arguments


def add_arguments(parser, name):
    group = parser.add_argument_group("search")
    group.add_argument("--load", required=True, help="source checkpoint (the unpruned model)")
    group.add_argument("--scores", required=True, help="SCORES file from `minitron importance`")
    budget = group.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params",
                        help="parameter budget, e.g. 70M or 4.5B (exact counts, embeddings "
                             "included)")
    budget.add_argument("--active-params",
                        help="budget of active parameters instead: those one token passes "
                             "through (a mixture-of-experts model's routed experts counted "
                             "moe_router_topk times per layer), e.g. 3B")
    group.add_argument("--tolerance", type=float, default=0.05,
                       help="relative budget tolerance (default 0.05: ±5%%)")
    group.add_argument("--space", required=True,
                       help="search space YAML: one list per field (num_layers, hidden_size, "
                            "ffn_hidden_size, num_attention_heads, num_query_groups and, for "
                            "mixture-of-experts models, num_moe_experts, moe_ffn_hidden_size, "
                            "moe_shared_expert_intermediate_size)")
    group.add_argument("--retrain-tokens", type=int,
                       help="distillation tokens per candidate before ranking")
    group.add_argument("--no-retrain", dest="retrain", action="store_false",
                       help="rank by zero-shot validation loss (no retraining)")
    group.add_argument("--teacher", help="teacher of the retraining (default --load)")
    group.add_argument("--depth-metric", choices=("ppl", "bi", "block_bi"), default="ppl",
                       help="how layers are chosen when num_layers shrinks (default ppl)")
    add_head_add_back_arguments(group)
    group.add_argument("--max-candidates", type=int, default=16,
                       help="refuse spaces with more candidates than this (default 16)")
    group.add_argument("--output", required=True, help="search directory (re-runs resume)")
    add_config_arguments(parser, skip=("student", "teacher", "output", "train_tokens", "resume",
                                       "tp", "pp", "seed", "output_format"),
                          group_title="retraining", aliases={"precision": ("--dtype",)})
    add_layout_arguments(parser)


def _settings(args):
    from megatron_minitron.search import SearchSettings, parse_params

    active = getattr(args, "active_params", None) is not None
    params = (parse_params(args.active_params, "--active-params") if active
              else parse_params(args.params))
    return SearchSettings(
        load=args.load, scores=args.scores, params=params, space=args.space,
        budget="active" if active else "total",
        output=args.output, tolerance=args.tolerance, retrain_tokens=args.retrain_tokens,
        retrain=args.retrain, teacher=args.teacher, depth_metric=args.depth_metric,
        head_add_back=args.head_add_back, max_candidates=args.max_candidates)


def validate(args, model_config=None) -> None:
    """The checks that need no checkpoint (``minitron run`` runs them for each step up front)."""
    from megatron_minitron.search.runner import check_settings

    check_settings(_settings(args))
    TrainConfig.from_args(args)


def main(args) -> int:
    from megatron_minitron.search import run_search

    settings = _settings(args)
    train = TrainConfig.from_args(args)
    try:
        run_search(settings, train)  # rank 0 prints the ranking and the selected checkpoint
    finally:
        parallel.teardown()
    return 0
