"""lm-eval-harness's model API over a checkpoint, without importing lm-eval-harness.

    from megatron_minitron.evaluation import CheckpointLM
    lm = CheckpointLM.from_checkpoint("CKPT", tp=2)
    lm.loglikelihood(requests)   # objects with .args == (context, continuation)

:mod:`megatron_minitron.evaluation.lm_eval_adapter` turns this into a registered lm-eval-harness
model. Every method is collective: under torchrun every rank calls it with the same requests,
data parallel ranks split the work and every rank gets every answer.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from megatron_minitron.evaluation.loglikelihood import (
    encode_pairs,
    rolling_requests,
    score_requests,
)


class CheckpointLM:
    """Log-likelihood scoring with lm-eval-harness's request and result conventions.

    Args:
        model: this rank's mcore GPTModel stage.
        tokenizer: the checkpoint's Hugging Face tokenizer.
        max_length: longest sequence scored at once (the model's positions).
        micro_batch_size: requests per forward.
    """

    def __init__(self, model, tokenizer, max_length: int, micro_batch_size: int = 8):
        from megatron_minitron.data import eos_id

        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.micro_batch_size = int(micro_batch_size)
        self.eot_token_id = eos_id(tokenizer)

    @classmethod
    def from_checkpoint(cls, load: str, tp: int = 1, pp: int = 1, micro_batch_size: int = 8,
                        seed: int = 1234, precision: str = "auto") -> "CheckpointLM":
        """Initialises the process groups (torchrun's world, or one process) and loads ``load``
        with its tokenizer at TP=``tp``, PP=``pp`` in ``precision`` (as ``--precision``); DP is
        the rest of the world."""
        from megatron_minitron import parallel
        from megatron_minitron.checkpoint.io import load_checkpoint, load_config
        from megatron_minitron.data import check_tokenizer_fits, load_tokenizer
        from megatron_minitron.precision import params_dtype

        cfg = load_config(load)
        layout = parallel.initialize(int(tp), int(pp), int(seed))
        cfg.check_layout(layout.tp, layout.pp)
        tokenizer = load_tokenizer(load)
        check_tokenizer_fits(tokenizer, cfg.vocab_size)
        model, _ = load_checkpoint(load, params_dtype(precision))
        return cls(model, tokenizer, cfg.max_position_embeddings, micro_batch_size)

    def _score(self, token_requests) -> List[Tuple[float, bool]]:
        return score_requests(self.model, token_requests, self.max_length, self.micro_batch_size,
                              pad_id=self.eot_token_id)

    def loglikelihood(self, requests: Sequence, **_) -> List[Tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` per request.

        Args:
            requests: objects whose ``args`` are ``(context, continuation)`` strings; an empty
                context stands for the end-of-text token.
        """
        pairs = [tuple(request.args[:2]) for request in requests]
        return self._score(encode_pairs(self.tokenizer, pairs, self.eot_token_id))

    def loglikelihood_rolling(self, requests: Sequence, **_) -> List[float]:
        """Log-likelihood of each whole text (``args == (text,)``) after the end-of-text token,
        over disjoint windows of ``max_length`` tokens: every token is scored exactly once."""
        texts = [request.args[0] for request in requests]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        windows, owners = [], []
        for index, token_ids in enumerate(encoded):
            for window in rolling_requests(token_ids, self.eot_token_id, self.max_length):
                windows.append(window)
                owners.append(index)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self._score(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: Sequence, **_) -> List[str]:
        """Not supported: this model scores log-likelihoods only."""
        raise NotImplementedError(
            "megatron_minitron checkpoints are evaluated by log-likelihood only "
            "(loglikelihood, loglikelihood_rolling); generation tasks (generate_until) are "
            "not supported: choose multiple-choice or perplexity tasks")
