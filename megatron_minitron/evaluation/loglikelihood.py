"""Log-likelihood of continuations given contexts, batched, at any TP/PP/DP layout.

A request is a pair of token lists ``(context, continuation)``. Its score is the sum of
``log p(token | everything before it)`` over the continuation's tokens, and whether every
continuation token is the model's greedy (arg-max) choice — lm-eval-harness's
``(logprob, is_greedy)``.

Batching: requests are sorted by length (longest first) and cut into micro-batches of
``micro_batch_size`` consecutive requests, each right-padded to a multiple of ``bucket`` tokens.
Micro-batches, not requests, are dealt to data parallel ranks (micro-batch ``i`` to rank
``i % dp``), so every request is computed in the same micro-batch with the same shape at any DP
size, and the gathered scores are bit-identical to a single-rank run. Consecutive micro-batches
of one shape go through one pipeline call.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch

from megatron_minitron import adapter, parallel, progress
from megatron_minitron.errors import UsageError
from megatron_minitron.model.forward import broadcast_from_last_stage, pipeline_forward
from megatron_minitron.parallel import log_rank0

Request = Tuple[Sequence[int], Sequence[int]]

BUCKET = 16  # sequence lengths are padded up to a multiple of this many tokens
RUN_LENGTH = 16  # micro-batches per pipeline call, at most (keeps progress reports regular)


def encode_pairs(tokenizer, pairs: Sequence[Tuple[str, str]], prefix_id: int
                 ) -> List[Tuple[List[int], List[int]]]:
    """Tokenizes ``(context, continuation)`` strings the way lm-eval-harness does.

    Trailing spaces of a context move to the front of its continuation; the continuation's
    tokens are those of ``context + continuation`` after the context's own tokens, so a token
    that straddles the boundary belongs to the continuation. An empty context becomes
    ``[prefix_id]`` (the end-of-text token), with the continuation tokenized alone.

    Args:
        tokenizer: a Hugging Face tokenizer; no special tokens are added.
        pairs: ``(context, continuation)`` strings.
        prefix_id: token that stands for an empty context.

    Returns:
        ``(context_ids, continuation_ids)`` per pair.
    """
    if not pairs:
        return []
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        moved.append((context, continuation))
    texts = sorted({c for c, _ in moved} | {c + d for c, d in moved})
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    encoded = []
    for context, continuation in moved:
        whole = ids[context + continuation]
        if not context:
            encoded.append(([prefix_id], list(whole)))
            continue
        context_ids = ids[context]
        encoded.append((list(context_ids), list(whole[len(context_ids):])))
    return encoded


def plan_micro_batches(requests: Sequence[Request], micro_batch_size: int,
                       max_length: int) -> List[List[int]]:
    """Request indices per micro-batch: longest first, ties in input order (deterministic)."""
    lengths = [min(len(c) + len(d) - 1, max_length) for c, d in requests]
    order = sorted(range(len(requests)), key=lambda i: (-lengths[i], i))
    return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def _padded_length(longest: int, max_length: int, bucket: int) -> int:
    return min(max_length, -(-longest // bucket) * bucket)


def build_micro_batch(requests: Sequence[Request], indices: Sequence[int], max_length: int,
                      bucket: int = BUCKET, pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """``tokens``/``labels``/``loss_mask`` [b, s] for the requests at ``indices``.

    Each row is ``context + continuation`` minus its last token, left-truncated to
    ``max_length`` (the context loses its oldest tokens) and right-padded to ``s``;
    ``loss_mask`` is 1 on the continuation's positions.
    """
    rows = []
    for index in indices:
        context, continuation = requests[index]
        if len(continuation) > max_length:
            raise UsageError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"model's {max_length} positions")
        if not context or not continuation:
            raise UsageError("every request needs at least one context and one continuation "
                             "token")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        rows.append((whole, len(continuation)))
    seq = _padded_length(max(len(w) - 1 for w, _ in rows), max_length, bucket)
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.long)  # [b, s]
    labels = torch.full((len(rows), seq), pad_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros((len(rows), seq), dtype=torch.float32)  # [b, s]
    for row, (whole, scored) in enumerate(rows):
        length = len(whole) - 1
        tokens[row, :length] = torch.tensor(whole[:-1])
        labels[row, :length] = torch.tensor(whole[1:])
        mask[row, length - scored:length] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def _tp_all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    return parallel.all_reduce(tensor, op, adapter.get_tp_group())


def continuation_scores(logits: torch.Tensor, batch: Dict[str, torch.Tensor]
                        ) -> Dict[str, torch.Tensor]:
    """Per-row summed log-probability and greedy flag from vocab-parallel logits.

    Args:
        logits: [b, s, v/tp] this TP rank's slice of the vocabulary (collective over TP).
        batch: holds ``labels`` and ``loss_mask`` [b, s].

    Returns:
        ``{"logprob": [b] float64, "greedy": [b] bool}``; greedy means every masked label is the
        arg-max over the full vocabulary (the lowest id on ties, as ``torch.argmax``).
    """
    mask = batch["loss_mask"].to(logits.device) > 0
    rows, cols = mask.nonzero(as_tuple=True)
    picked = logits[rows, cols].float()  # [n, v/tp]
    targets = batch["labels"].to(logits.device)[rows, cols]  # [n]
    local_vocab = picked.shape[-1]
    start = adapter.tp_rank() * local_vocab
    local_max, local_arg = picked.max(dim=-1)  # [n]
    top = _tp_all_reduce(local_max.clone(), "max")
    sum_exp = _tp_all_reduce((picked - top[:, None]).exp().sum(dim=-1), "sum")
    owned = (targets >= start) & (targets < start + local_vocab)
    local_target = (targets - start).clamp(0, local_vocab - 1)
    target_logit = torch.where(owned, picked.gather(1, local_target[:, None]).squeeze(1),
                               torch.zeros_like(top))
    target_logit = _tp_all_reduce(target_logit, "sum")
    no_candidate = torch.iinfo(torch.long).max
    arg = torch.where(local_max == top, local_arg + start, torch.full_like(local_arg, no_candidate))
    arg = _tp_all_reduce(arg, "min")
    token_logprob = (target_logit - top - sum_exp.log()).double()  # [n]
    batch_size = mask.shape[0]
    logprob = torch.zeros(batch_size, dtype=torch.float64, device=logits.device)
    logprob.index_add_(0, rows, token_logprob)
    misses = torch.zeros(batch_size, dtype=torch.long, device=logits.device)
    misses.index_add_(0, rows, (arg != targets).long())
    return {"logprob": logprob.cpu(), "greedy": (misses == 0).cpu()}


class _Progress:
    """A live bar on a terminal; otherwise a rank-0 log line each time another tenth of its
    micro-batches is done."""

    def __init__(self, total: int):
        self.total, self.done, self.reported, self.start = total, 0, 0, time.perf_counter()
        self.bar = progress.bar(total=total, desc="tasks", unit="batch")

    def advance(self, count: int) -> None:
        self.done += count
        self.bar.update(count)
        tenth = self.done * 10 // max(self.total, 1)
        if tenth > self.reported and self.total >= 20 and self.bar.disable:
            self.reported = tenth
            log_rank0(f"scored {self.done}/{self.total} micro-batches "
                      f"({time.perf_counter() - self.start:.0f} s)")

    def close(self) -> None:
        self.bar.close()


def _same_shape_runs(batches: List[Dict[str, torch.Tensor]],
                     longest: int = RUN_LENGTH) -> List[Tuple[int, int]]:
    """[start, end) ranges of at most ``longest`` consecutive micro-batches of one shape."""
    runs, start = [], 0
    shapes = [batch["tokens"].shape for batch in batches]
    for index in range(1, len(batches) + 1):
        if index == len(batches) or shapes[index] != shapes[start] or index - start == longest:
            runs.append((start, index))
            start = index
    return runs


def score_requests(model, requests: Sequence[Request], max_length: int,
                   micro_batch_size: int = 8, bucket: int = BUCKET,
                   pad_id: int = 0) -> List[Tuple[float, bool]]:
    """``(logprob, is_greedy)`` of every request, on every rank (collective over all ranks).

    Args:
        model: this rank's mcore GPTModel stage.
        requests: ``(context_ids, continuation_ids)``; identical on every rank.
        max_length: the model's positions; longer requests lose their oldest context tokens.
        micro_batch_size: requests per forward.
        bucket: sequence lengths are padded up to a multiple of this.
        pad_id: token id used for padding (never scored).

    Returns:
        One ``(logprob, is_greedy)`` per request, in input order; equal at every DP/PP size and
        equal up to floating-point summation order at every TP size.
    """
    from megatron.core import parallel_state

    if not requests:
        return []
    plan = plan_micro_batches(requests, micro_batch_size, max_length)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = plan[dp_rank::dp_size]
    batches = [build_micro_batch(requests, indices, max_length, bucket, pad_id) for indices in mine]
    table = None
    if adapter.is_last_stage():
        table = torch.zeros(len(requests), 2, dtype=torch.float64)  # [N, (logprob, greedy)]
    tracker = _Progress(len(mine))
    for start, end in _same_shape_runs(batches):
        outputs = pipeline_forward(model, batches[start:end], continuation_scores)
        tracker.advance(end - start)
        if outputs is None:
            continue
        for indices, scores in zip(mine[start:end], outputs):
            table[indices, 0] = scores["logprob"]
            table[indices, 1] = scores["greedy"].double()
    tracker.close()
    if table is not None:
        if dp_size > 1:  # one rank holds each entry: the sum is exact
            parallel.all_reduce(table, group=adapter.get_dp_group())
        table = [(float(lp), bool(gr)) for lp, gr in table.tolist()]
    return broadcast_from_last_stage(table)


def rolling_requests(token_ids: Sequence[int], prefix_id: int, max_length: int
                     ) -> List[Tuple[List[int], List[int]]]:
    """Requests that score every token of a text exactly once, windows of ``max_length``.

    The first window starts from ``prefix_id``; each later window predicts the next
    ``max_length`` tokens with the token before them as context (lm-eval-harness's disjoint
    rolling windows with a one-token context). Summing the requests' log-probabilities gives
    the text's log-likelihood.
    """
    full = [prefix_id] + list(token_ids)
    requests = []
    for start in range(0, len(token_ids), max_length):
        end = min(start + max_length, len(token_ids))
        first = max(0, end - max_length)
        requests.append((full[first:start + 1], full[start + 1:end + 1]))
    return requests
