"""Evaluation: LM loss / perplexity, and zero-shot downstream tasks by log-likelihood.

Public functions:

* :func:`lm_loss` (``lm``): token-weighted loss over micro-batches, exact over DP
* :func:`score_requests`, :func:`encode_pairs` (``loglikelihood``): ``(logprob, is_greedy)``
  of context/continuation pairs at any layout
* :func:`prepare_tasks`, :func:`score_tasks`, :data:`TASKS` (``tasks``): HellaSwag, PIQA, ARC,
  Winogrande, LAMBADA from the offline evaluation sets
* :class:`CheckpointLM` (``harness``): lm-eval-harness's request API over a checkpoint;
  ``lm_eval_adapter`` registers it with lm-eval-harness as ``minitron`` when that is installed
"""

from megatron_minitron.evaluation.harness import CheckpointLM  # noqa: F401
from megatron_minitron.evaluation.lm import lm_loss  # noqa: F401
from megatron_minitron.evaluation.loglikelihood import encode_pairs, score_requests  # noqa: F401
from megatron_minitron.evaluation.tasks import TASKS, prepare_tasks, score_tasks  # noqa: F401
