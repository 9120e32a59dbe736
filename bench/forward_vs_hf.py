"""Our mcore model against transformers on the same weights: forward, and forward + backward.

    python bench/forward_vs_hf.py                        # the ~22M bench model (random weights)
    python bench/forward_vs_hf.py --load TEACHER --name smollm2
                                                         # a checkpoint, e.g. SmolLM2-135M from
                                                         # `minitron import-hf`

Both models hold the same weights (ours exported through the package's own Hugging Face mapping
into a transformers model built in memory). The four measurements (ours/HF × forward/
forward+backward) run interleaved round by round in one process, so machine noise hits all
alike (the order reversed every other round); each time is the median of the rounds, and each
ratio the median of the rounds' own ratios (ours / transformers of the same round, which cancels
the machine's drift between rounds; the ratio of the medians is kept beside it). Ours runs the
path every stage uses: the forward through mcore's pipeline schedule
(``model.forward.pipeline_forward``, logits collected), the forward + backward through the
training path's cross-entropy (``distill.losses.logits_loss``).
Prints a table and writes bench/results/forward_vs_hf[_NAME].json; goal: ours / transformers
≤ 1.0 for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import (ceiling_shares, interleaved_times, matmul_flops_per_s,  # noqa: E402
                    matmul_weights, model_20m, print_table, write_result)


def _models(load, dtype):
    from megatron_minitron import adapter, parallel
    from megatron_minitron.checkpoint.io import load_checkpoint
    from megatron_minitron.hf.mapping import hf_config_from, hf_state_from

    parallel.initialize(1, 1)
    if load:
        ours, cfg = load_checkpoint(load)
    else:
        cfg = model_20m()
        torch.manual_seed(0)
        ours = adapter.build_gpt_model(cfg)
    import transformers

    hf_config = hf_config_from(cfg, torch.float32)
    hf_config._attn_implementation = "sdpa"
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf.load_state_dict(hf_state_from(ours, cfg, torch.float32),
                                             strict=False)
    missing = [k for k in missing if "rotary" not in k
               and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    hf.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    if dtype != torch.float32:
        ours, hf = ours.to(dtype), hf.to(dtype)
    return ours, hf, cfg


def _passes(ours, hf, batches):
    from megatron_minitron import adapter
    from megatron_minitron.compat.cpu import cuda_to_cpu, model_compute
    from megatron_minitron.distill.losses import LogitLossSpec, logits_loss
    from megatron_minitron.model.forward import pipeline_forward, position_ids_for

    def ours_forward():
        pipeline_forward(ours, batches, lambda logits, batch: {"logits": logits})

    def hf_forward():
        hf.eval()
        with torch.no_grad():
            for batch in batches:
                hf(batch["tokens"]).logits

    spec = LogitLossSpec("kl", kd_weight=0.0, ce_weight=1.0)

    def ours_backward():  # the training path's forward and (chunked) cross-entropy
        ours.train()
        with cuda_to_cpu():
            for batch in batches:
                tokens = batch["tokens"]
                with model_compute():  # the model and its loss, as the trainer runs them
                    logits = adapter.stage_forward(ours, tokens, position_ids_for(tokens))
                    result = logits_loss(logits, None, batch["labels"].t(), None, spec)
                (result.total / result.tokens).backward()
        ours.zero_grad(set_to_none=True)

    def hf_backward():
        hf.train()
        for batch in batches:
            hf(batch["tokens"], labels=batch["labels"]).loss.backward()
        hf.zero_grad(set_to_none=True)

    return {"ours_forward": ours_forward, "hf_forward": hf_forward,
            "ours_forward_backward": ours_backward, "hf_forward_backward": hf_backward}


def _max_logit_difference(ours, hf, batch) -> float:
    from megatron_minitron.model.forward import full_logits

    mine = full_logits(ours, batch["tokens"], batch["tokens"].shape[0])
    hf.eval()
    with torch.no_grad():
        theirs = hf(batch["tokens"]).logits
    return float((mine.float() - theirs.float()).abs().max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", help="checkpoint to measure (default: the ~22M bench model)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--name", default=None, help="result file suffix")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    from megatron_minitron.config import count_parameters

    ours, hf, cfg = _models(args.load, dtype)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_length + 1),
                         generator=generator)
    mbs = args.micro_batch_size
    batches = [{"tokens": data[i:i + mbs, :-1], "labels": data[i:i + mbs, 1:]}
               for i in range(0, args.samples, mbs)]
    difference = _max_logit_difference(ours, hf, batches[0])
    times = interleaved_times(_passes(ours, hf, batches), args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}
    # ours / transformers within each round: the ratio reported is their median
    rounds = {pass_: [ours / hf for ours, hf in zip(times[f"ours_{pass_}"], times[f"hf_{pass_}"])]
              for pass_ in ("forward", "forward_backward")}
    tokens = args.samples * args.seq_length
    result = {
        "model": ("checkpoint " + args.load) if args.load else "22M bench model",
        "parameters": count_parameters(cfg)["total"], "dtype": args.dtype,
        "tokens_per_round": tokens, "rounds": args.rounds, "micro_batch_size": mbs,
        "max_logit_difference": difference,
        "times_s": times,
        **{f"{pass_}_ratio": statistics.median(rounds[pass_]) for pass_ in rounds},
        **{f"{pass_}_ratio_of_medians": median[f"ours_{pass_}"] / median[f"hf_{pass_}"]
           for pass_ in rounds},
        **{f"{pass_}_round_ratios": rounds[pass_] for pass_ in rounds},
        "goal": "forward_ratio <= 1.0; forward_backward_ratio <= 1.0",
    }
    for name, seconds in median.items():
        result[f"{name}_tokens_per_s"] = tokens / seconds
    # against this machine's matrix-multiply rate in the same dtype: 2N FLOPs per token forward,
    # 6N forward + backward (N = parameters outside the embedding lookup)
    ceiling = matmul_flops_per_s(dtype)
    weights = matmul_weights(cfg)
    result["matmul_gflops"] = ceiling / 1e9
    ceiling_shares(result, {name: (6 if name.endswith("backward") else 2) * weights
                            for name in median}, ceiling)
    rows = [{"pass": pass_, "ours tok/s": f"{result[f'ours_{pass_}_tokens_per_s']:.0f}",
             "transformers tok/s": f"{result[f'hf_{pass_}_tokens_per_s']:.0f}",
             "ours / transformers (time)": f"{result[f'{pass_}_ratio']:.3f}",
             "rounds' range": "{:.3f}-{:.3f}".format(min(result[f"{pass_}_round_ratios"]),
                                                     max(result[f"{pass_}_round_ratios"])),
             "ours of matmul ceiling": f"{result[f'ours_{pass_}_of_ceiling']:.0%}"}
            for pass_ in ("forward", "forward_backward")]
    print(f"{result['model']}, {result['parameters']:,} parameters, {args.dtype}, "
          f"{tokens} tokens per round, medians of {args.rounds} rounds; max |logit difference| "
          f"{difference:.2e}; matmul ceiling {result['matmul_gflops']:.0f} GFLOP/s")
    print_table(rows, list(rows[0]))
    suffix = f"_{args.name}" if args.name else ""
    print("wrote", write_result("forward_vs_hf" + suffix, result))


if __name__ == "__main__":
    main()
