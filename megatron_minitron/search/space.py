"""Search space and parameter budget: every buildable architecture within ``params ± tolerance``.

    space = load_space("space.yaml", source)          # {"hidden_size": [384, 448], ...}
    candidates, stats = enumerate_candidates(source, space, parse_params("70M"), 0.05)

A space file holds one list per architecture field the pruner shrinks (``num_layers``,
``hidden_size``, ``ffn_hidden_size``, ``num_attention_heads``, ``num_query_groups`` and, for a
mixture-of-experts source, ``num_moe_experts``, ``moe_ffn_hidden_size``,
``moe_shared_expert_intermediate_size``); a field left out keeps the source's value
(``num_query_groups`` then follows the pruner's default, ``min(source groups, heads)``).
Parameter counts are exact (:func:`count_parameters`); the budget is the total count, or with
``budget="active"`` the parameters one token passes through (a mixture-of-experts model's
routed experts counted ``moe_router_topk`` times per layer).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_minitron.config import ModelConfig, count_parameters
from megatron_minitron.errors import UsageError
from megatron_minitron.prune.plan import ALL_TARGET_KEYS, target_config, target_keys

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_SHORT = {"num_layers": "L", "hidden_size": "H", "ffn_hidden_size": "F",
          "num_attention_heads": "A", "num_query_groups": "G", "num_moe_experts": "E",
          "moe_ffn_hidden_size": "X", "moe_shared_expert_intermediate_size": "S"}
BUDGETS = ("total", "active")
"""What a parameter budget counts (keys of :func:`count_parameters`)."""


def parse_params(text: str, flag: str = "--params") -> int:
    """``"70M"`` → 70_000_000; also K, B (or G), T suffixes and plain integers."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not match:
        raise UsageError(f"{flag} {text!r} is not a parameter count; write e.g. 70M, 4.5B or "
                         "135000000")
    value = int(round(float(match.group(1)) * _SUFFIX[match.group(2).upper()]))
    if value < 1:
        raise UsageError(f"{flag} {text!r} must be positive")
    return value


def format_params(count: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.2f}{suffix}"
    return str(count)


def load_space(path: str, source: ModelConfig) -> Dict[str, List[int]]:
    """Reads and checks a space YAML file against the source model."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--space {path} does not exist; write a YAML file with one list per "
                         f"field ({', '.join(target_keys(source))})")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--space {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    return check_space(data, source, f"--space {path}")


def check_space(data, source: ModelConfig, where: str = "search space") -> Dict[str, List[int]]:
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{where} must be a mapping of field: [values], e.g. "
                         "hidden_size: [384, 448]")
    space: Dict[str, List[int]] = {}
    known = target_keys(source)
    for key, values in data.items():
        if key in ALL_TARGET_KEYS and key not in known:
            raise UsageError(f"{where}: field {key!r} needs a mixture-of-experts source "
                             f"{'with a shared expert ' if source.is_moe else ''}(this one "
                             f"has none); use {', '.join(known)}")
        if key not in known:
            raise UsageError(f"{where}: unknown field {key!r}; use {', '.join(known)}")
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UsageError(f"{where}: {key} must be a list of integers, got {values!r}")
        for value in values:
            if not 1 <= value <= getattr(source, key):
                raise UsageError(f"{where}: {key} {value} is outside 1..{getattr(source, key)} "
                                 "(the source's value); pruning only shrinks")
        space[key] = sorted(set(values))
    return space


@dataclass(frozen=True)
class Candidate:
    """One architecture of the space inside the budget."""

    target: Tuple[Tuple[str, int], ...]
    """(field, value) pairs handed to the pruner."""
    params: int
    """Exact parameter count the budget counts (total, or active)."""
    config: ModelConfig

    @property
    def name(self) -> str:
        cfg = self.config
        return "-".join(f"{_SHORT[key]}{getattr(cfg, key)}" for key in target_keys(cfg))

    @property
    def target_dict(self) -> Dict[str, int]:
        return dict(self.target)

    def architecture(self) -> Dict[str, int]:
        return {key: getattr(self.config, key) for key in target_keys(self.config)}


def enumerate_candidates(source: ModelConfig, space: Dict[str, List[int]], params: int,
                         tolerance: float, tp: int = 1, pp: int = 1, budget: str = "total",
                         kept_layers: Optional[Callable[[int], Sequence[int]]] = None
                         ) -> Tuple[List[Candidate], Dict[str, int]]:
    """Every combination of ``space`` that the pruner can build (and that divides into the
    TP×PP layout) whose exact count is within ``params·(1 ± tolerance)``, sorted by count.

    ``budget``: ``total`` or ``active`` parameters (:data:`BUDGETS`). ``kept_layers(n)``: the
    source layers the pruner keeps at depth ``n`` (from the scores), so that a mixed dense/MoE
    stack is counted with the pattern of the layers it will really keep (default: its first
    ``n`` layers).

    Returns the candidates and counts of what was dropped (``combinations``, ``unbuildable``,
    ``outside_budget``) plus ``closest`` (the nearest count, for error messages).
    """
    if not 0 <= tolerance < 1:
        raise UsageError(f"--tolerance {tolerance} must be in [0, 1), e.g. 0.05 for ±5%")
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r}; use one of {BUDGETS}")
    keys = list(space)
    low, high = params * (1 - tolerance), params * (1 + tolerance)
    stats = {"combinations": 0, "unbuildable": 0, "outside_budget": 0, "closest": None}
    found: Dict[str, Candidate] = {}
    for values in itertools.product(*(space[key] for key in keys)):
        stats["combinations"] += 1
        target = dict(zip(keys, values))
        layers = None
        if kept_layers is not None and source.is_moe:
            layers = kept_layers(target.get("num_layers", source.num_layers))
        try:
            cfg = target_config(source, target, tp, pp, kept_layers=layers)
        except UsageError:
            stats["unbuildable"] += 1
            continue
        count = count_parameters(cfg)[budget]
        if stats["closest"] is None or abs(count - params) < abs(stats["closest"] - params):
            stats["closest"] = count
        if not low <= count <= high:
            stats["outside_budget"] += 1
            continue
        candidate = Candidate(tuple(sorted(target.items())), count, cfg)
        found.setdefault(candidate.name, candidate)
    return sorted(found.values(), key=lambda c: (c.params, c.name)), stats
