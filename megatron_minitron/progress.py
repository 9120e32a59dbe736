"""Live progress bars (tqdm) on rank 0.

    from megatron_minitron import progress
    with progress.bar(total=len(batches), desc="eval") as bar:
        for batch in batches:
            ...
            bar.update()
    progress.write("step 4/8 | loss 3.1")   # a line that does not tear a live bar

Bars go to stderr on rank 0 only. ``MINITRON_PROGRESS`` decides when they show: unset (the
default) — only where stderr is a terminal (tqdm's ``disable=None``), so logs, pipes and tests
get none; ``1`` — always; ``0`` — never. Everything a bar replaces (step lines, log.jsonl) is
still written, so a run without bars reports the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import sys

ENV = "MINITRON_PROGRESS"


def _rank0() -> bool:
    from megatron_minitron import parallel

    return parallel.is_rank0()


def _setting():
    """``MINITRON_PROGRESS``: True (always), False (never) or None (terminal only)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    return True if setting in ("1", "true", "yes", "on") else None


def _disable():
    """tqdm's ``disable``: True off rank 0 or when turned off, None (terminal only) by default."""
    setting = _setting()
    if not _rank0() or setting is False:
        return True
    return False if setting else None


def enabled() -> bool:
    """Whether a bar made now would show."""
    disable = _disable()
    if disable is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return not disable


def _width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return -1


def bar(total=None, desc: str = "", leave: bool = False, **kwargs):
    """A rank-0 bar (a no-op object elsewhere or when bars are off)."""
    if _width(sys.stderr) == 0:  # a terminal that reports no size (under `script`): tqdm
        kwargs.setdefault("ncols", 100)  # would draw nothing
        kwargs.setdefault("nrows", 24)
    else:
        kwargs.setdefault("dynamic_ncols", True)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=_disable(), leave=leave, file=sys.stderr,
                **kwargs)


def live() -> bool:
    """Whether some bar is on screen now."""
    from tqdm import tqdm

    return any(not getattr(instance, "disable", True) for instance in list(tqdm._instances))


def _print_above(stream, line: str) -> None:
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):  # clears the bars, redraws them after
        stream.write(line + "\n")
        stream.flush()


def write(line: str) -> None:
    """Prints one line to stdout; above the bars when some are live."""
    if live() and not isinstance(sys.stdout, _LineWriter):
        _print_above(sys.stdout, line)
    else:
        print(line, flush=True)


class _LineWriter:
    """stdout stand-in that prints whole lines above the bars."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            _print_above(self.stream, line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            _print_above(self.stream, self.pending)
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def lines_above_bars(active: bool = True):
    """While bars show: ``print`` and console logging go above them instead of through them."""
    if not active:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    writer = _LineWriter(sys.stdout)
    with contextlib.redirect_stdout(writer), logging_redirect_tqdm():
        try:
            yield
        finally:
            writer.flush()


def quiet_third_party_bars() -> None:
    """Where our bars are off, libraries' own tqdm bars (GGUF dequantisation in transformers)
    are off too: tqdm reads ``TQDM_DISABLE`` once, when it is first imported, so this runs at
    start-up (``minitron`` calls it before importing anything that imports tqdm). Bars made
    here pass ``disable=`` themselves and are unaffected."""
    setting = _setting()
    shown = setting if setting is not None else bool(getattr(sys.stderr, "isatty", bool)())
    if not shown or os.environ.get("RANK", "0") != "0":
        os.environ.setdefault("TQDM_DISABLE", "1")


@contextlib.contextmanager
def third_party_bars():
    """Inside ``with``, transformers' own bars (weight loading) show only where ours would: on
    rank 0 of a terminal, or with ``MINITRON_PROGRESS=1``."""
    hf_logging = None if enabled() else _transformers_logging()
    was_on = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if was_on:
        hf_logging.disable_progress_bar()  # transformers passes disable= itself
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _transformers_logging():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging
