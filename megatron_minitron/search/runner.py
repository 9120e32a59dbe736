"""Lightweight architecture search (arXiv 2407.14679 §2.3): prune every candidate of a space
inside a parameter budget from cached importance scores, retrain each briefly by distillation,
rank them by validation LM loss.

    settings = SearchSettings(load="ckpt", scores="scores.pt", params=70_000_000,
                              space="space.yaml", output="search", retrain_tokens=2_000_000)
    summary = run_search(settings, TrainConfig(data_prefix=["data/web"], seq_length=1024,
                                               global_batch_size=32))

Layout of ``output``::

    search_config.json                      what the search was asked (a re-run must match)
    candidates/NAME/pruned/                 the pruned checkpoint
    candidates/NAME/retrain/                its short distillation run (final/ = the model)
    candidates/NAME/result.json             losses and curves; its presence marks it done
    search.json, search.csv, search.md      the ranking
    search.png                              loss vs parameters and the candidates' loss curves
    best -> candidates/NAME/retrain/final   the selected checkpoint (pruned/ with --no-retrain)

Each candidate's validation LM loss is measured on the same validation samples before
(zero-shot) and after retraining. A re-run skips finished candidates and resumes an interrupted
retraining. Every rank runs this function; rank 0 prunes and writes the tables.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from megatron_minitron import parallel
from megatron_minitron.checkpoint.io import is_checkpoint
from megatron_minitron.config import count_parameters
from megatron_minitron.distill.config import TrainConfig
from megatron_minitron.errors import UsageError
from megatron_minitron.files import read_json, write_json_atomic
from megatron_minitron.prune.plan import DEFAULT_HEAD_ADD_BACK, head_add_back_mode
from megatron_minitron.search.space import (
    BUDGETS,
    Candidate,
    enumerate_candidates,
    format_params,
    load_space,
)

logger = logging.getLogger("megatron_minitron")

CONFIG_FILE = "search_config.json"
RESULT_FILE = "result.json"


@dataclass
class SearchSettings:
    """What ``minitron search`` is asked; see the module docstring."""

    load: str
    scores: str
    params: int
    """The parameter budget (what it counts: ``budget``)."""
    space: str
    output: str
    tolerance: float = 0.05
    retrain_tokens: Optional[int] = None
    retrain: bool = True
    teacher: Optional[str] = None
    """Distillation teacher of the retraining (default: ``load``)."""
    depth_metric: str = "ppl"
    head_add_back: Union[bool, str] = DEFAULT_HEAD_ADD_BACK
    """none, query or output (``True``/``False``: output/none); a mode string after init."""
    max_candidates: int = 16
    budget: str = "total"
    """``total``: ``params`` counts every parameter; ``active``: those one token passes through
    (``--active-params``; a mixture-of-experts model's routed experts ``moe_router_topk``
    times per layer)."""

    def __post_init__(self):
        self.head_add_back = head_add_back_mode(self.head_add_back)
        if self.budget not in BUDGETS:
            raise UsageError(f"budget {self.budget!r} is unknown; use {', '.join(BUDGETS)}")

    def teacher_path(self) -> str:
        return self.teacher or self.load


def check_settings(settings: SearchSettings) -> None:
    """The checks that need no checkpoint (``minitron run`` runs them for each step up front)."""
    if settings.retrain and not settings.retrain_tokens:
        raise UsageError("--retrain-tokens is required (or --no-retrain to rank by the "
                         "zero-shot loss)")
    if settings.retrain_tokens is not None and settings.retrain_tokens < 1:
        raise UsageError(f"--retrain-tokens {settings.retrain_tokens} must be >= 1")
    if settings.max_candidates < 1:
        raise UsageError(f"--max-candidates {settings.max_candidates} must be >= 1")
    if os.path.isfile(settings.output):
        raise UsageError(f"--output {settings.output} is a file; pass a directory")
    if not os.path.isfile(settings.space):
        raise UsageError(f"--space {settings.space} does not exist; write a search space YAML "
                         "(examples/README.md)")


def warn_if_not_exportable(candidates: List[Candidate]) -> Dict[str, str]:
    """Logs one warning naming the candidates that ``export-hf`` could not write; returns
    {name: reason} of those."""
    from megatron_minitron.hf.mapping import hf_exportable

    reasons = {c.name: hf_exportable(c.config) for c in candidates}
    refused = {name: reason for name, reason in reasons.items() if reason}
    if refused:
        name, reason = next(iter(refused.items()))
        logger.warning("search: %d of %d candidates cannot be exported with export-hf (%s); "
                       "%s: %s", len(refused), len(reasons), ", ".join(refused), name, reason)
    return refused


class Search:
    """Checks everything cheap in ``__init__``; :meth:`run` does the work."""

    def __init__(self, settings: SearchSettings, train: TrainConfig):
        self.settings = settings
        check_settings(settings)
        from megatron_minitron.commands.common import checkpoint_config
        from megatron_minitron.importance import load_scores

        self.source = checkpoint_config(settings.load)
        if settings.teacher:
            checkpoint_config(settings.teacher)
        if not os.path.isfile(settings.scores):
            raise UsageError(f"--scores {settings.scores} does not exist; compute it with "
                             "`minitron importance`")
        self.scores = load_scores(settings.scores, self.source)
        space = load_space(settings.space, self.source)
        self.space = space
        self.candidates, stats = enumerate_candidates(
            self.source, space, settings.params, settings.tolerance, train.tp, train.pp,
            budget=settings.budget, kept_layers=self._kept_layers)
        active = " active" if settings.budget == "active" else ""
        budget = (f"{format_params(settings.params)}{active} ±{settings.tolerance:.0%} "
                  f"({stats['combinations']} combinations, {stats['unbuildable']} not buildable)")
        if not self.candidates:
            closest = stats["closest"]
            hint = f"; the closest count is {format_params(closest)}" if closest else ""
            flag = "--active-params" if active else "--params"
            raise UsageError(f"no architecture of --space {settings.space} lies within {budget}"
                             f"{hint}; widen the space, the --tolerance or change {flag}")
        if len(self.candidates) > settings.max_candidates:
            raise UsageError(f"--space {settings.space} gives {len(self.candidates)} candidates "
                             f"within {budget}, more than --max-candidates "
                             f"{settings.max_candidates}; narrow the space, lower --tolerance or "
                             "raise --max-candidates")
        self.budget = budget
        if parallel.is_rank0():
            warn_if_not_exportable(self.candidates)
        self.train = dataclasses.replace(
            train, student=settings.load,
            output=os.path.join(settings.output, "candidates", ".unused"),  # checks only
            teacher=settings.teacher_path() if settings.retrain else None, resume="auto",
            train_tokens=(settings.retrain_tokens if settings.retrain
                          else (train.global_batch_size or 1) * (train.seq_length or 1)),
            eval_samples=train.eval_samples or max(train.global_batch_size or 1, 32))
        from megatron_minitron.distill.trainer import Trainer

        Trainer(self.train, mode=self._mode())  # the same checks a candidate's run makes
        self._check_output()

    def _kept_layers(self, num_layers: int) -> List[int]:
        """The source layers the pruner will keep at ``num_layers`` (the MoE pattern a
        candidate's count depends on)."""
        from megatron_minitron.prune.plan import choose_layers

        try:
            return choose_layers(self.scores, self.source, num_layers,
                                 self.settings.depth_metric, None)
        except (KeyError, UsageError):  # scores without depth metrics: pruning will say so
            return list(range(num_layers))

    # ------------------------------------------------------------------ paths and identity

    def _mode(self) -> str:
        return "distill" if self.settings.retrain else "ce"

    def _dir(self, candidate: Candidate, *parts: str) -> str:
        return os.path.join(self.settings.output, "candidates", candidate.name, *parts)

    def identity(self) -> Dict[str, Any]:
        s = self.settings
        train = {k: v for k, v in self.train.run_identity().items()
                 if k not in ("student", "teacher", "train_tokens")}
        identity = {"load": os.path.abspath(s.load), "scores": os.path.abspath(s.scores),
                    "params": s.params, "tolerance": s.tolerance, "space": self.space,
                    "retrain": s.retrain,
                    "retrain_tokens": s.retrain_tokens if s.retrain else None,
                    "teacher": os.path.abspath(s.teacher_path()) if s.retrain else None,
                    "depth_metric": s.depth_metric, "head_add_back": s.head_add_back,
                    "eval_samples": self.train.eval_samples, "train": train}
        if s.budget != "total":  # searches by total count keep their saved identity
            identity["budget"] = s.budget
        return identity

    def _check_output(self) -> None:
        path = os.path.join(self.settings.output, CONFIG_FILE)
        if os.path.isdir(self.settings.output) and os.listdir(self.settings.output):
            saved = read_json(path)
            if saved is None:
                raise UsageError(f"--output {self.settings.output} exists and holds no search "
                                 f"({CONFIG_FILE}); choose a new or empty directory")
            if isinstance(saved.get("head_add_back"), bool):  # written when it was a switch
                saved["head_add_back"] = head_add_back_mode(saved["head_add_back"])
            current = json.loads(json.dumps(self.identity()))
            changed = sorted(k for k in set(saved) | set(current)
                             if saved.get(k) != current.get(k))
            if changed:
                raise UsageError(f"--output {self.settings.output} holds a search with other "
                                 f"settings ({', '.join(changed)}); re-run its own command or "
                                 "choose a new --output")

    # ------------------------------------------------------------------ the work

    def run(self) -> Dict[str, Any]:
        if parallel.is_rank0():
            os.makedirs(os.path.join(self.settings.output, "candidates"), exist_ok=True)
            write_json_atomic(os.path.join(self.settings.output, CONFIG_FILE), self.identity())
            print(f"search: {len(self.candidates)} candidates within {self.budget}", flush=True)
        results = []
        with parallel.held_process_group():
            for index, candidate in enumerate(self.candidates, 1):
                if parallel.is_rank0():
                    print(f"search: candidate {index}/{len(self.candidates)} {candidate.name} "
                          f"({format_params(candidate.params)})", flush=True)
                results.append(self._candidate(candidate))
            summary = None
            if parallel.is_rank0():
                summary = write_summary(self.settings, self.budget, results)
            return parallel.broadcast_object(summary)

    def _candidate(self, candidate: Candidate) -> Dict[str, Any]:
        result_path = self._dir(candidate, RESULT_FILE)
        done = parallel.broadcast_object(read_json(result_path) if parallel.is_rank0() else None)
        if done is not None:
            return done
        pruned = self._dir(candidate, "pruned")
        if parallel.is_rank0() and not is_checkpoint(pruned):
            from megatron_minitron.prune import prune_checkpoint

            prune_checkpoint(self.settings.load, self.scores, candidate.target_dict, pruned,
                             depth_metric=self.settings.depth_metric,
                             head_add_back=self.settings.head_add_back,
                             target_tp=self.train.tp, target_pp=self.train.pp)
        parallel.barrier()
        result = self._train(candidate, pruned)
        if parallel.is_rank0():
            write_json_atomic(result_path, result)
        parallel.barrier()
        return result

    def _train(self, candidate: Candidate, pruned: str) -> Dict[str, Any]:
        from megatron_minitron.distill.trainer import Trainer

        run_dir = self._dir(candidate, "retrain" if self.settings.retrain else "zero_shot")
        config = dataclasses.replace(self.train, student=pruned, output=run_dir)
        zero_path = self._dir(candidate, "zero_shot.json")
        trainer = Trainer(config, mode=self._mode())
        try:
            trainer.setup()
            zero = parallel.broadcast_object(read_json(zero_path) if parallel.is_rank0()
                                             else None)
            if zero is None:
                zero = trainer.evaluate()
                if parallel.is_rank0():
                    write_json_atomic(zero_path, zero)
            if self.settings.retrain:
                trainer.run()
        finally:
            del trainer
            parallel.teardown()  # inside held_process_group: mcore's groups only
            gc.collect()
        counts = count_parameters(candidate.config)
        result = {"name": candidate.name, "params": counts["total"],
                  "architecture": candidate.architecture(), "zero_shot": zero,
                  "checkpoint": pruned}
        if candidate.config.is_moe:
            result["active_params"] = counts["active"]
        if self.settings.retrain:
            train_curve, valid = read_log(run_dir)
            result.update(retrained=valid[-1] if valid else None, train_curve=train_curve,
                          valid_curve=valid, checkpoint=os.path.join(run_dir, "final"),
                          retrain_tokens=train_curve[-1]["tokens_seen"] if train_curve else 0)
        return result


def read_log(run_dir: str):
    """(train records with cumulative ``tokens_seen``, validation records) of a run's log."""
    train, valid, seen = [], [], 0
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return train, valid
    for line in open(path):
        record = json.loads(line)
        keep = {k: record.get(k) for k in ("step", "loss", "kd", "ce", "tokens")}
        if record.get("split") == "train":
            seen += int(record.get("tokens") or 0)
            train.append(dict(keep, tokens_seen=seen))
        elif record.get("split") == "valid":
            valid.append(keep)
    return train, valid


# ---------------------------------------------------------------------- tables and plot

def _metric(result: Dict[str, Any], when: str) -> Optional[float]:
    value = result.get(when)
    return None if value is None else float(value["ce"])


def rank_results(results: List[Dict[str, Any]], retrain: bool) -> List[Dict[str, Any]]:
    """Rows sorted by the ranking loss (retrained LM loss, or zero-shot with --no-retrain), each
    with its rank before and after retraining."""
    rows = [dict(r) for r in results]
    inf = float("inf")
    for when in ("zero_shot", "retrained") if retrain else ("zero_shot",):
        order = sorted(rows, key=lambda r: (_metric(r, when) or inf, r["params"]))
        for position, row in enumerate(order, 1):
            row[f"rank_{when}"] = position
    key = "rank_retrained" if retrain else "rank_zero_shot"
    return sorted(rows, key=lambda r: r[key])


COLUMNS = ("rank", "name", "params", "num_layers", "hidden_size", "ffn_hidden_size",
           "num_attention_heads", "num_query_groups", "zero_shot_loss", "zero_shot_rank",
           "retrained_loss", "retrain_tokens")
MOE_COLUMNS = ("active_params", "num_moe_experts", "moe_ffn_hidden_size",
               "moe_shared_expert_intermediate_size")
"""Columns of a mixture-of-experts search, after ``num_query_groups`` where it has them."""


def table_columns(table: List[Dict[str, Any]]) -> List[str]:
    columns = list(COLUMNS)
    extra = [c for c in MOE_COLUMNS if any(c in entry for entry in table)]
    at = columns.index("num_query_groups") + 1
    return columns[:at] + extra + columns[at:]


def table_rows(rows: List[Dict[str, Any]], retrain: bool) -> List[Dict[str, Any]]:
    table = []
    for row in rows:
        entry = {"rank": row["rank_retrained" if retrain else "rank_zero_shot"],
                 "name": row["name"], "params": row["params"], **row["architecture"],
                 **({"active_params": row["active_params"]} if "active_params" in row else {}),
                 "zero_shot_loss": _metric(row, "zero_shot"),
                 "zero_shot_rank": row["rank_zero_shot"],
                 "retrained_loss": _metric(row, "retrained") if retrain else None,
                 "retrain_tokens": row.get("retrain_tokens")}
        table.append(entry)
    return table


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_summary(settings: SearchSettings, budget: str,
                  results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Rank 0: search.json/.csv/.md, search.png and the ``best`` link; returns the summary."""
    rows = rank_results(results, settings.retrain)
    table = table_rows(rows, settings.retrain)
    columns = table_columns(table)
    out = settings.output
    best = rows[0]
    summary = {"budget": budget, "params": settings.params, "budget_counts": settings.budget,
               "tolerance": settings.tolerance,
               "retrain": settings.retrain, "retrain_tokens": settings.retrain_tokens,
               "ranked_by": "validation LM loss after retraining" if settings.retrain
               else "zero-shot validation LM loss", "best": best["name"],
               "best_checkpoint": os.path.join(out, "best"), "table": table, "candidates": rows}
    write_json_atomic(os.path.join(out, "search.json"), summary)
    tmp = os.path.join(out, "search.csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, os.path.join(out, "search.csv"))
    lines = [f"# Search: {budget}", "",
             f"Ranked by {summary['ranked_by']}"
             + (f" ({settings.retrain_tokens:,} retraining tokens per candidate)."
                if settings.retrain else "."), "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_fmt(entry.get(c)) for c in columns) + " |" for entry in table]
    lines += ["", f"Selected: **{best['name']}** → `{summary['best_checkpoint']}`", ""]
    tmp = os.path.join(out, "search.md.tmp")
    with open(tmp, "w") as handle:
        handle.write("\n".join(lines))
    os.replace(tmp, os.path.join(out, "search.md"))
    plot_search(rows, settings.retrain, os.path.join(out, "search.png"))
    link = os.path.join(out, "best")
    target = os.path.relpath(best["checkpoint"], out)
    tmp = link + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    print("\n".join(lines), flush=True)
    return summary


def plot_search(rows: List[Dict[str, Any]], retrain: bool, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if retrain else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    params = [r["params"] / 1e6 for r in rows]
    ax.scatter(params, [_metric(r, "zero_shot") for r in rows], marker="o",
               facecolors="none", edgecolors="tab:gray", label="zero-shot")
    if retrain:
        ax.scatter(params, [_metric(r, "retrained") for r in rows], marker="o",
                   color="tab:blue", label="after retraining")
    ax.scatter([params[0]], [_metric(rows[0], "retrained" if retrain else "zero_shot")],
               marker="*", s=200, color="tab:red", label=f"selected: {rows[0]['name']}")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation LM loss")
    ax.set_title("candidates")
    ax.legend(fontsize=8)
    if retrain:
        ax = axes[0][1]
        for row in rows:
            curve = row.get("train_curve") or []
            ax.plot([p["tokens_seen"] for p in curve], [p["loss"] for p in curve],
                    label=row["name"], linewidth=1)
        ax.set_xlabel("retraining tokens")
        ax.set_ylabel("training loss (distillation)")
        ax.set_title("retraining curves")
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_search(settings: SearchSettings, train: TrainConfig) -> Dict[str, Any]:
    """Checks (one-line UsageErrors before any heavy work), then runs the search."""
    return Search(settings, train).run()
