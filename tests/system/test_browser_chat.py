"""The Chat tab's state in a real browser: votes never desync from the DB, trash = New conversation, a reload
mid-answer keeps the question and what was written, Retry keeps earlier answers browsable, no dead controls."""

from __future__ import annotations

import contextlib

import pytest
from apphelpers import rows, shared_real_app
from test_browser import ANSWER_TIMEOUT, send_chat, shot, thumb_states
from test_browser import browser as browser  # noqa: F401  (pytest fixtures, used by name)
from test_browser import chromium_path as chromium_path  # noqa: F401
from test_browser import page as page  # noqa: F401
from test_browser import tiny_app as tiny_app  # noqa: F401

pytestmark = pytest.mark.browser


def _db_thumb(db, content: str) -> str | None:
    """The thumb the DB holds on the (one) answer to the user message `content`."""
    (user,) = rows(db, "SELECT id FROM messages WHERE role = 'user' AND content = ?", (content,))
    (answer,) = rows(db, "SELECT id FROM messages WHERE parent_id = ?", (user["id"],))
    fb = rows(db, "SELECT value FROM feedback WHERE response_id = ?", (answer["id"],))
    return fb[0]["value"] if fb else None


def test_a_double_click_on_a_thumb_leaves_page_and_db_agreeing(page, tiny_app):
    send_chat(page, "Double click me", 1)
    for _ in range(3):
        page.locator("#chatbot button[aria-label='Like'], #chatbot button[aria-label='Liked']").last.dblclick()
        page.wait_for_timeout(1500)  # both events answered
        held = _db_thumb(tiny_app.db_path, "Double click me")
        assert thumb_states(page) == ["Dislike,Liked" if held == "up" else "Dislike,Like"], held
    page.locator("#chatbot button[aria-label='Like'], #chatbot button[aria-label='Liked']").last.click()
    page.wait_for_timeout(1500)
    held = _db_thumb(tiny_app.db_path, "Double click me")
    assert held in ("up", "cleared") and thumb_states(page) == ["Dislike,Liked" if held == "up" else "Dislike,Like"]
    shot(page, "chat-01-double-click")


def test_the_trash_icon_starts_a_new_conversation(page, tiny_app):
    send_chat(page, "First conversation", 1)
    page.locator("#chatbot button[aria-label='Clear']").click()
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('First conversation')")
    send_chat(page, "Second conversation", 1)
    assert "First conversation" not in page.inner_text("#chatbot")
    first = rows(tiny_app.db_path, "SELECT conversation_id FROM messages WHERE content = 'First conversation'")
    second = rows(tiny_app.db_path, "SELECT conversation_id FROM messages WHERE content = 'Second conversation'")
    assert first[0]["conversation_id"] != second[0]["conversation_id"]
    page.reload()
    page.wait_for_function("() => document.querySelector('#chatbot')?.innerText.includes('Second conversation')")
    assert "First conversation" not in page.inner_text("#chatbot")


def test_no_share_button_and_nothing_covers_the_first_message(page, tiny_app):
    send_chat(page, "Where are the icons?", 1)
    assert page.locator("#chatbot button[aria-label='Share']").count() == 0
    assert page.locator("#chatbot label, #chatbot [data-testid='block-label']").filter(has_text="Chat").count() == 0
    shot(page, "chat-02-no-share")


def test_retry_keeps_earlier_answers_browsable_with_their_votes(page, tiny_app):
    first = send_chat(page, "Retry me", 1)
    page.locator("#chatbot button[aria-label='Like']").last.click()
    page.wait_for_function("() => document.querySelector('#vote-note').innerText.includes('recorded')")
    page.get_by_role("button", name="🔄 Retry").click()
    page.wait_for_function("() => document.querySelector('#answer-pager-note')?.innerText.includes('Answer 2 of 2')")
    assert thumb_states(page) == ["Dislike,Like"]  # the new answer has no vote yet
    page.click("#answer-prev")
    page.wait_for_function("() => document.querySelector('#answer-pager-note')?.innerText.includes('Answer 1 of 2')")
    assert page.locator("#chatbot [data-testid='bot']").last.inner_text() == first
    assert thumb_states(page) == ["Dislike,Liked"]  # and its vote with it
    shot(page, "chat-03-retry-pager")
    page.click("#answer-next")
    page.wait_for_function("() => document.querySelector('#answer-pager-note')?.innerText.includes('Answer 2 of 2')")


@pytest.fixture(scope="module")
def real_app(request, tmp_path_factory):
    return shared_real_app(request, tmp_path_factory)


@pytest.mark.slow
def test_a_reload_mid_answer_shows_the_question_and_what_was_written(browser, real_app):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    with contextlib.closing(context):
        page.goto(real_app.url)
        page.wait_for_selector("#chat-input textarea")
        question = "Write a very long story about a dragon who learns to bake bread, with many details."
        page.fill("#chat-input textarea", question)
        page.press("#chat-input textarea", "Enter")
        page.wait_for_function(
            "() => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
            " return b.length && b[b.length - 1].innerText.length > 20; }",
            timeout=ANSWER_TIMEOUT,
        )
        page.reload()
        page.wait_for_function(
            "q => document.querySelector('#chatbot')?.innerText.includes(q)", arg=question, timeout=ANSWER_TIMEOUT
        )
        page.wait_for_function(
            "() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 1", timeout=10_000
        )
        shot(page, "chat-04-reloaded-mid-answer")
        (user,) = rows(real_app.db_path, "SELECT id FROM messages WHERE content = ?", (question,))
        (answer,) = rows(
            real_app.db_path, "SELECT content, finish_reason FROM messages WHERE parent_id = ?", (user["id"],)
        )
        assert answer["finish_reason"] == "cancelled" and answer["content"]
        shown = page.locator("#chatbot [data-testid='bot']").first.inner_text()
        assert answer["content"].split()[0] in shown
