"""Architecture search inside a parameter budget (``minitron search``)."""

from megatron_minitron.search.runner import SearchSettings, read_log, run_search
from megatron_minitron.search.space import (
    Candidate,
    enumerate_candidates,
    format_params,
    load_space,
    parse_params,
)

__all__ = ["Candidate", "SearchSettings", "enumerate_candidates", "format_params",
           "load_space", "parse_params", "read_log", "run_search"]
