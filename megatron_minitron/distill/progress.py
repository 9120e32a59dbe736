"""Rank-0 progress of a run: a live bar over the steps (on a terminal; see
:mod:`megatron_minitron.progress`), a console line every ``log_interval`` steps,
``OUTPUT/log.jsonl`` and (when the ``tensorboard`` package is installed) TensorBoard scalars."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import time
from typing import Dict, Optional

from megatron_minitron import parallel
from megatron_minitron import progress as bars
from megatron_minitron.distill import state


def _format_parts(report: Dict[str, float], distilling: bool, intermediate: bool) -> str:
    parts = []
    if distilling:
        parts.append(f"kd {report['kd']:.4f}")
    parts.append(f"ce {report['ce']:.4f}")
    if intermediate:
        parts.append(f"is {report['is']:.4f}")
    if report.get("moe_aux_loss") is not None:
        parts.append(f"moe aux {report['moe_aux_loss']:.4f}")
    return " ".join(parts)


class ProgressLog:
    """Writes one record per step and per validation; prints every ``log_interval`` steps."""

    def __init__(self, config, total_steps: int, start_step: int, tokens_per_step: int):
        self.config = config
        self.total_steps = total_steps
        self.start_step = start_step
        self.tokens_per_step = tokens_per_step
        self.started = time.perf_counter()
        self.step_seconds = 0.0
        self.steps_timed = 0
        self.active = parallel.is_rank0()
        self.path = os.path.join(config.output, state.LOG_FILE)
        self.writer = self._tensorboard() if self.active else None
        self.bar = bars.bar(total=total_steps, initial=start_step,
                            desc="distill" if config.distilling else "train", unit="step")

    def _tensorboard(self):
        folder = self.config.tensorboard_dir
        if folder == "none" or importlib.util.find_spec("tensorboard") is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(folder or os.path.join(self.config.output, "tensorboard"))

    def _write(self, record: Dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def step(self, step: int, report: Dict[str, float], seconds: float) -> None:
        if not self.active:
            return
        self.step_seconds += seconds
        self.steps_timed += 1
        self._write(dict(report, split="train", step=step, seconds=round(seconds, 6)))
        if self.writer is not None:
            for name in ("loss", "kd", "ce", "is", "moe_aux_loss", "lr", "grad_norm"):
                if report.get(name) is not None:
                    self.writer.add_scalar(f"train/{name}", report[name], step)
        mean = self.step_seconds / self.steps_timed
        self.bar.set_postfix_str(f"loss {report['loss']:.4f} | "
                                 f"{self.tokens_per_step / mean:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)
        if step % self.config.log_interval and step != self.total_steps:
            return
        eta = datetime.timedelta(seconds=round(mean * (self.total_steps - step)))
        grad_norm = report.get("grad_norm")
        parts = _format_parts(report, self.config.distilling, bool(self.config.intermediate))
        bars.write(f"step {step}/{self.total_steps} | loss {report['loss']:.4f} ({parts})"
                   f" | lr {report['lr']:.3e} | grad norm "
                   f"{grad_norm if grad_norm is None else f'{grad_norm:.3f}'} | "
                   f"{self.tokens_per_step / mean:,.0f} tok/s | ETA {eta}")

    def validation(self, step: int, report: Optional[Dict[str, float]]) -> None:
        if not self.active or report is None:
            return
        self._write(dict(report, split="valid", step=step))
        if self.writer is not None:
            for name in ("loss", "kd", "ce", "is"):
                self.writer.add_scalar(f"valid/{name}", report[name], step)
        parts = _format_parts(report, self.config.distilling, bool(self.config.intermediate))
        bars.write(f"validation at step {step} | loss {report['loss']:.4f} ({parts}) | "
                   f"{report['tokens']} tokens")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
