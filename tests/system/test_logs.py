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


def test_a_refusal_is_one_short_line(capsys):
    logs.refusal("No answer with id 'x\nTraceback (most recent call last):\n  fake' exists." + " and more" * 60)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlhf-live: refused: No answer with id 'x Traceback (most recent")
    assert len(err) == len("rlhf-live: refused: ") + logs.MAX_REFUSAL_CHARS + 1 and err.endswith("…\n")


def test_user_errors_become_quiet_gr_errors_and_other_errors_pass_through(capsys):
    import gradio as gr

    from rlhf_live.serving.settings import InvalidRequest
    from rlhf_live.ui.common import UserError

    with pytest.raises(gr.Error) as refused, UserError():
        raise InvalidRequest("Please type a message first: it is empty.")
    assert refused.value.message == "Please type a message first: it is empty."
    assert refused.value.print_exception is False  # Gradio prints no traceback for it
    assert capsys.readouterr().err == "rlhf-live: refused: Please type a message first: it is empty.\n"
    with pytest.raises(KeyError), UserError():
        raise KeyError("a bug, not a refusal")
    assert capsys.readouterr().err == ""


def test_the_app_logs_refused_input_in_one_line_and_real_errors_with_their_traceback(
    request, tiny_lm_dir, tmp_path_factory
):
    import time

    from apphelpers import app_config, fn_index_of, raw_queue_call
    from gradio_client import Client

    app = shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)
    start = len(app.log.read_bytes())
    client = Client(app.url, verbose=False)
    with pytest.raises(Exception, match="it is empty"):
        client.predict("   ", "", api_name="/chat")
    with pytest.raises(Exception, match="the limit is 4,000"):
        client.predict("x" * 4001, "", api_name="/chat")
    # A broken request no check anticipates (a slider value that is not a number) is a real error.
    send = fn_index_of(app_config(app.url), "Send")
    done = raw_queue_call(app.url, send, ["Hello", None, None, "", "warm", 0.9, 16])
    assert done["success"] is False
    deadline = time.monotonic() + 10
    while "Original error:" not in app.log.read_bytes()[start:].decode() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = app.log.read_bytes()[start:].decode().splitlines()
    assert lines[:3] == [
        "rlhf-live: refused: Please type a message first: it is empty.",
        "rlhf-live: refused: Your message is 4,001 characters long; the limit is 4,000. Please shorten it.",
        "Traceback (most recent call last):",
    ]
    assert lines[-1] == "Original error: TypeError: '<' not supported between instances of 'str' and 'float'"
    assert len(lines) > 20  # the whole traceback, chained
