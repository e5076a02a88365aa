"""Library noise a user cannot act on goes, once, to the debug log; our own messages and real problems stay visible.

Knows which library warnings are noise here (deprecations inside transformers/peft/torch, bitsandbytes' note that
the hub `kernels` package is missing, weight-loading progress bars) and how a refused request is logged (one line,
`refusal`, where the web framework would print a traceback); knows nothing of the app. `quiet_libraries()` runs
first thing in the CLI, before those libraries are imported.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("rlhf_live.libraries")
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
"""Loggers whose warnings are about optional speed-ups or internals (e.g. bitsandbytes' CPU kernel from the hub)."""
_seen: set[tuple[str, str]] = set()

refusals = logging.getLogger("rlhf_live.refused")
"""One line per refused request (empty message, over a limit, no permission...): the person was told why."""
MAX_REFUSAL_CHARS = 300


class _Stderr(logging.Handler):
    """One formatted line to whatever sys.stderr is when it is written (the app's log, a test's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stream must not fail the request
            self.handleError(record)


_handler = _Stderr()
_handler.setFormatter(logging.Formatter("rlhf-live: %(message)s"))
refusals.addHandler(_handler)
refusals.setLevel(logging.INFO)
refusals.propagate = False


def refusal(message: str) -> None:
    """Log a refused request as one line ('rlhf-live: refused: Please type a message first...'); no traceback."""
    # One line however the text reads (it may quote what a person sent), and short.
    text = " ".join(str(message).split())
    text = text if len(text) <= MAX_REFUSAL_CHARS else text[: MAX_REFUSAL_CHARS - 1] + "…"
    refusals.info("refused: %s", text)


def _once(kind: str, message: str) -> None:
    if (kind, message) not in _seen:
        _seen.add((kind, message))
        log.debug("%s: %s", kind, message)


class _ToDebug(logging.Filter):
    """Drops a noisy library's warnings from its own handlers after logging them once at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        _once(record.name, record.getMessage())
        return False


_previous = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Deprecation notices raised inside libraries go to the debug log once; every other warning shows as before."""
    inside_library = f"{os.sep}site-packages{os.sep}" in str(filename)
    if inside_library and issubclass(category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
        _once(category.__name__, str(message))
        return
    _previous(message, category, filename, lineno, file, line)


def quiet_libraries(progress_bars: bool = False) -> None:
    """Route library noise to the debug log (`RLHF_LIVE_LOG=debug` shows it); hide weight-loading bars unless asked."""
    level = os.environ.get("RLHF_LIVE_LOG", "").upper()
    if level:
        logging.basicConfig(level=getattr(logging, level, logging.INFO))
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToDebug) for f in logger.filters):
            logger.addFilter(_ToDebug())
    global _previous
    if warnings.showwarning is not _show_warning:
        _previous, warnings.showwarning = warnings.showwarning, _show_warning
    if not progress_bars:  # read by huggingface_hub (and transformers' bars through it) when first imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
