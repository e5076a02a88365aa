"""Library noise goes to the debug log once; our own warnings and the app's start-up output stay readable."""

import logging
import os
import warnings

import pytest
from apphelpers import shared_tiny_app

from rlhf_live import logs


@pytest.fixture
def quiet(monkeypatch):
    """quiet_libraries() in front of a handler that collects what would have been shown."""
    shown = []
    monkeypatch.setattr(logs, "_seen", set())
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args: shown.append(str(message)))
    logs.quiet_libraries()
    yield shown


def test_library_deprecations_go_to_the_debug_log_once(quiet, caplog):
    caplog.set_level(logging.DEBUG, logger="rlhf_live.libraries")
    library = os.path.join("x", "site-packages", "transformers", "modeling_utils.py")
    for _ in range(3):
        warnings.showwarning(FutureWarning("`is_gradient_checkpointing` is deprecated"), FutureWarning, library, 1)
    assert [r.getMessage() for r in caplog.records] == ["FutureWarning: `is_gradient_checkpointing` is deprecated"]
    assert quiet == []
    # Our own code's warnings, and a library's non-deprecation warning, still show.
    warnings.showwarning(UserWarning("look at this"), UserWarning, library, 2)
    warnings.showwarning(FutureWarning("ours"), FutureWarning, os.path.join("rlhf_live", "policy.py"), 3)
    assert quiet == ["look at this", "ours"]


def test_bitsandbytes_kernel_notice_is_debug_only(quiet, caplog):
    caplog.set_level(logging.DEBUG, logger="rlhf_live.libraries")
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "No module named 'kernels'")
    noisy.error("a real failure")
    assert [r.levelno for r in caplog.records if r.name == "rlhf_live.libraries"] == [logging.DEBUG]
    assert [r.getMessage() for r in caplog.records if r.name == noisy.name] == ["a real failure"]


def test_the_app_starts_without_library_warnings(request, tiny_lm_dir, tmp_path_factory):
    app = shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)
    log = app.log.read_text(errors="replace")
    log = log[: log.index("Running on local URL")]  # start-up only: later requests log their own errors
    for noise in ("Warning", "warnings.warn", "kernels-community", "Loading weights"):
        assert noise not in log, log
