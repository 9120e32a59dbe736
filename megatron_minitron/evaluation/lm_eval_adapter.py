"""Our checkpoints as an lm-eval-harness model named ``minitron`` (needs ``pip install lm-eval``).

    python -m megatron_minitron.evaluation.lm_eval_adapter --model minitron \
        --model_args load=CKPT,tp=1,pp=1 --tasks hellaswag,piqa --batch_size 8
    torchrun --nproc-per-node 4 -m megatron_minitron.evaluation.lm_eval_adapter \
        --model minitron --model_args load=CKPT,tp=2 --tasks lambada_openai

or, from Python::

    import lm_eval
    import megatron_minitron.evaluation.lm_eval_adapter  # registers "minitron"
    lm_eval.simple_evaluate(model="minitron", model_args="load=CKPT", tasks=["hellaswag"])

Importing this module registers the model; the plain ``lm_eval`` command does not know it, hence
the ``python -m`` entry point above, which registers it and runs lm-eval-harness's own command
line. Multiple-choice and perplexity tasks work; generation tasks raise NotImplementedError.

Under torchrun every process tells lm-eval-harness it is rank 0 of 1, so each builds every
request; our scorer then splits them over the data parallel ranks and gathers the answers, and
only global rank 0 prints.
"""

from __future__ import annotations

import contextlib
import os
import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on an optional package
    raise ImportError("megatron_minitron.evaluation.lm_eval_adapter needs lm-eval-harness: "
                      "pip install lm-eval (or use `minitron eval --tasks`, which does not)"
                      ) from err

from megatron_minitron.evaluation.harness import CheckpointLM


@register_model("minitron")
class MinitronLM(CheckpointLM, LM):
    """lm-eval-harness model over a megatron_minitron checkpoint.

    Args:
        load: checkpoint directory (with its ``tokenizer/``).
        tp: tensor parallel size.
        pp: pipeline parallel size.
        batch_size: requests per forward (lm-eval's ``--batch_size``; ``auto`` means 8).
        seed: random seed of the process groups.
        precision: weight dtype, as ``minitron eval --precision`` (auto: bf16 on GPU, fp32 on
            CPU).
    """

    def __init__(self, load: str, tp: int = 1, pp: int = 1, batch_size=8, seed: int = 1234,
                 precision: str = "auto", **_):
        LM.__init__(self)
        size = int(batch_size) if str(batch_size).isdigit() else 8
        loaded = CheckpointLM.from_checkpoint(load, tp=int(tp), pp=int(pp),
                                              micro_batch_size=size, seed=int(seed),
                                              precision=str(precision))
        CheckpointLM.__init__(self, loaded.model, loaded.tokenizer, loaded.max_length, size)

    def loglikelihood(self, requests, **kwargs):
        results = CheckpointLM.loglikelihood(self, requests)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, **kwargs):
        results = CheckpointLM.loglikelihood_rolling(self, requests)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results


def main() -> None:
    """lm-eval-harness's command line with ``minitron`` registered; quiet on ranks > 0."""
    from lm_eval.__main__ import cli_evaluate

    quiet = int(os.environ.get("RANK", "0")) != 0
    with open(os.devnull, "w") as sink, (contextlib.redirect_stdout(sink) if quiet
                                         else contextlib.nullcontext()):
        cli_evaluate()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
