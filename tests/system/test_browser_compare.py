"""The Compare tab in a real browser: answers stream side by side, a new request clears the last one, modes that
cannot apply say so before the request, and the boxes, votes and reveal fit a 1280x900 window."""

from __future__ import annotations

import contextlib

import pytest
from apphelpers import rows, shared_real_app
from test_browser import ANSWER_TIMEOUT, shot
from test_browser import browser as browser  # noqa: F401  (pytest fixtures, used by name)
from test_browser import chromium_path as chromium_path  # noqa: F401
from test_browser import page as page  # noqa: F401
from test_browser import tiny_app as tiny_app  # noqa: F401

pytestmark = pytest.mark.browser


def _compare(page, prompt: str) -> None:
    page.get_by_role("tab", name="Compare").click()
    page.fill("#cmp-input textarea", prompt)
    page.click("#cmp-go")
    page.wait_for_selector("#choose-a:not([disabled])", timeout=ANSWER_TIMEOUT)


def _box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def test_a_new_request_clears_the_last_answers_and_reveal(page, tiny_app):
    _compare(page, "First pair")
    page.click("#choose-a")
    page.wait_for_function("() => document.querySelector('#cmp-reveal').innerText.includes('Recorded')")
    assert page.locator("#cmp-use").is_visible()
    # The vote's result is in view with the buttons, without scrolling.
    assert _box(page, "#cmp-reveal")["y"] + _box(page, "#cmp-reveal")["height"] <= 900
    shot(page, "compare-01-revealed")
    page.fill("#cmp-input textarea", "Second pair")
    page.click("#cmp-go")
    page.wait_for_function("() => document.querySelector('#cmp-reveal').innerText.trim() === ''")
    page.wait_for_selector("#choose-a:not([disabled])", timeout=ANSWER_TIMEOUT)
    assert not page.locator("#cmp-use").is_visible()
    assert "both answers are finished" in page.inner_text("#cmp-note").lower()
    (pair,) = rows(
        tiny_app.db_path,
        "SELECT c.a_id FROM comparisons c JOIN messages m ON m.id = c.a_id JOIN messages u ON u.id = m.parent_id"
        " WHERE u.content = 'Second pair'",
    )
    assert pair["a_id"]
    assert page.locator(".error, [data-testid='error']").count() == 0


def test_modes_that_cannot_apply_say_so_before_the_request(page, tiny_app):
    page.get_by_role("tab", name="Compare").click()
    page.wait_for_function("() => document.querySelector('#cmp-modes-note').innerText.includes('applies once')")
    note = page.inner_text("#cmp-modes-note")
    assert "previous version" in note and "original (base) model" in note
    page.click("#cmp-mode")
    options = page.locator("[role='option']").all_inner_texts()
    assert [o.replace("✓", "").strip() for o in options] == ["Two answers of the live model"]
    page.keyboard.press("Escape")
    # The chosen mode's text is not clipped in its box.
    assert page.evaluate(
        "() => { const i = document.querySelector('#cmp-mode input'); return i.scrollWidth <= i.clientWidth; }"
    )


def test_the_two_boxes_line_up_and_the_votes_fit_the_window(page, tiny_app):
    _compare(page, "Line them up")
    a, b = _box(page, "#cmp-a"), _box(page, "#cmp-b")
    assert abs(a["y"] - b["y"]) < 1 and abs(a["height"] - b["height"]) < 1
    for button in ("#choose-a", "#choose-bad", "#cmp-reveal"):
        box = _box(page, button)
        assert box["y"] + box["height"] <= 900, button
    shot(page, "compare-02-aligned")


@pytest.fixture(scope="module")
def real_app(request, tmp_path_factory):
    return shared_real_app(request, tmp_path_factory)


@pytest.mark.slow
def test_both_answers_stream_side_by_side(browser, real_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    with contextlib.closing(context):
        page.goto(real_app.url)
        page.wait_for_selector("#chat-input textarea")
        page.get_by_role("tab", name="Compare").click()
        page.fill("#cmp-input textarea", "Tell me a long story about a lighthouse keeper and a storm.")
        page.click("#cmp-go")
        # Both boxes show text while the answers are still being written (the vote buttons are still locked).
        page.wait_for_function(
            "() => ['#cmp-a', '#cmp-b'].every(s => document.querySelector(s + ' .md').innerText.trim().length > 0)"
            " && document.querySelector('#choose-a').disabled",
            timeout=ANSWER_TIMEOUT,
        )
        first = [page.inner_text(f"{s} .md") for s in ("#cmp-a", "#cmp-b")]
        print(first)
        shot(page, "compare-03-streaming")
        page.wait_for_selector("#choose-a:not([disabled])", timeout=ANSWER_TIMEOUT)
        last = [page.inner_text(f"{s} .md") for s in ("#cmp-a", "#cmp-b")]
        assert all(len(x) > len(f) for x, f in zip(last, first))
