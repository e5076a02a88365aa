"""The app in a real browser: Playwright driving Debian's Chromium against `python app.py` (tiny model).

Chat + thumbs (recorded in the DB, restored after a reload), one Compare round (choice in the DB, sources
revealed), and user text rendered as text, never as markup. Screenshots of every step go to tests/artifacts/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from apphelpers import rows, shared_tiny_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ANSWER_TIMEOUT = 60_000  # ms; the tiny model answers in well under a second, the first request warms up
XSS = 'Look: <script>window.__xss=1</script> and <img src=x onerror="window.__xss=2"> done'


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (`make browser`, or apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture(scope="module")
def tiny_app(request, tiny_lm_dir, tmp_path_factory):
    return shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tiny_app):
    """A fresh browser context (its own localStorage, so its own voter) on the app."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(tiny_app.url)
    page.wait_for_selector("#chat-input textarea")
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def bot_messages(page):
    return page.locator("#chatbot [data-testid='bot']")


def send_chat(page, text: str, n_answers: int) -> str:
    """Type `text` in the Chat box, press Enter, wait until answer number `n_answers` is finished; return its text."""
    page.fill("#chat-input textarea", text)
    page.press("#chat-input textarea", "Enter")
    # The version label is added only once the answer is complete and stored.
    page.wait_for_function(
        "n => { const b = document.querySelectorAll('#chatbot [data-testid=\"bot\"]');"
        " return b.length >= n && b[n - 1].innerText.includes('written by'); }",
        arg=n_answers,
        timeout=ANSWER_TIMEOUT,
    )
    page.wait_for_function("() => document.querySelector('#chat-input textarea').value === ''")
    return bot_messages(page).nth(n_answers - 1).inner_text()


def thumb_states(page) -> list[str]:
    """aria-labels of the thumb buttons of each answer: Gradio 6 shows a chosen thumb as 'Liked' / 'Disliked'."""
    return page.eval_on_selector_all(
        "#chatbot .message-buttons-left",
        "els => els.map(e => [...e.querySelectorAll('button')].map(b => b.getAttribute('aria-label'))"
        ".filter(l => /like/i.test(l)).join(','))",
    )


def _letters(text: str) -> str:
    """Letters and digits only: Markdown rendering consumes backslash escapes, `*` and `_` in the random text."""
    return "".join(c for c in text if c.isalnum())


def test_chat_thumbs_reload_compare(page, tiny_app):
    db = tiny_app.db_path
    shot(page, "01-empty")
    answer = send_chat(page, "Hello from the browser", 1)
    shot(page, "02-answered")
    # The version label is rendered as small text, not as the raw tag.
    assert "written by base" in answer and "<sub>" not in answer
    assert page.locator("#chatbot [data-testid='bot'] sub").first.inner_text() == "written by base"
    user_rows = rows(db, "SELECT * FROM messages WHERE role = 'user' AND content = 'Hello from the browser'")
    assert len(user_rows) == 1
    (stored,) = rows(db, "SELECT * FROM messages WHERE parent_id = ?", (user_rows[0]["id"],))
    assert stored["role"] == "assistant" and stored["adapter_version"] == "base"
    assert thumb_states(page) == ["Dislike,Like"]

    page.locator("#chatbot button[aria-label='Like']").last.click()
    page.wait_for_function("() => document.querySelector('#vote-note').innerText.includes('recorded')")
    assert "👍 recorded" in page.inner_text("#vote-note")
    shot(page, "03-liked")
    assert thumb_states(page) == ["Dislike,Liked"]
    fb = rows(db, "SELECT value, voter FROM feedback WHERE response_id = ?", (stored["id"],))
    assert [r["value"] for r in fb] == ["up"]
    (conv,) = rows(db, "SELECT session_id FROM conversations WHERE id = ?", (stored["conversation_id"],))
    assert fb[0]["voter"] == conv["session_id"]

    # Reload: the conversation and the thumb come back (localStorage keeps the client id and conversation).
    page.reload()
    page.wait_for_function(
        "() => document.querySelector('#chatbot')?.innerText.includes('Hello from the browser')"
        " && document.querySelector('#chatbot [aria-label=\"Liked\"]') !== null",
        timeout=ANSWER_TIMEOUT,
    )
    shot(page, "04-reloaded")
    assert thumb_states(page) == ["Dislike,Liked"]
    assert bot_messages(page).count() == 1

    # A second turn continues the same conversation.
    send_chat(page, "And a second question", 2)
    second = rows(db, "SELECT * FROM messages WHERE content = 'And a second question'")
    assert [(m["conversation_id"], m["parent_id"]) for m in second] == [(stored["conversation_id"], stored["id"])]
    assert thumb_states(page) == ["Dislike,Liked", "Dislike,Like"]

    # Compare: two answers, choose A, see the sources.
    page.get_by_role("tab", name="Compare").click()
    assert page.locator("#choose-a").is_disabled()
    page.fill("#cmp-input textarea", "Pick the better answer")
    page.click("#cmp-go")
    page.wait_for_selector("#choose-a:not([disabled])", timeout=ANSWER_TIMEOUT)
    shot(page, "05-compare")
    (pair,) = rows(
        db,
        "SELECT c.* FROM comparisons c JOIN messages m ON m.id = c.a_id"
        " JOIN messages u ON u.id = m.parent_id WHERE u.content = 'Pick the better answer'",
    )
    assert pair["choice"] is None
    a_text = rows(db, "SELECT content FROM messages WHERE id = ?", (pair["a_id"],))[0]["content"]
    b_text = rows(db, "SELECT content FROM messages WHERE id = ?", (pair["b_id"],))[0]["content"]
    # The tiny random model writes control characters, backslashes and Markdown marks, which the browser renders
    # away: compare letters and digits.
    assert _letters(page.inner_text("#cmp-a")) == _letters(a_text)
    assert _letters(page.inner_text("#cmp-b")) == _letters(b_text)
    assert "written by" not in page.inner_text("#cmp-reveal")  # sources hidden before the vote
    page.click("#choose-a")
    page.wait_for_function("() => document.querySelector('#cmp-reveal').innerText.includes('written by')")
    shot(page, "06-chosen")
    reveal = page.inner_text("#cmp-reveal")
    assert reveal == "Recorded: A is better. A was written by base, B by base."
    assert rows(db, "SELECT choice, voter FROM comparisons WHERE id = ?", (pair["id"],)) == [
        {"choice": "A", "voter": conv["session_id"]}
    ]
    for button in ("#choose-a", "#choose-b", "#choose-tie", "#choose-bad"):
        assert page.locator(button).is_disabled(), button
    # No stray default "Run" button (a component built by accident inside the Blocks).
    assert page.get_by_role("button", name="Run", exact=True).count() == 0

    # The Data tab shows the vote that was just made.
    page.get_by_role("tab", name="Data").click()
    page.wait_for_function("() => /A\\/B choices: A [1-9]/.test(document.body.innerText)")
    shot(page, "07-data")


def test_user_text_is_rendered_as_text_never_as_markup(page, tiny_app):
    send_chat(page, XSS, 1)
    page.wait_for_timeout(300)
    shot(page, "08-xss")
    user_text = page.locator("#chatbot [data-testid='user']").first.inner_text()
    assert user_text.strip() == XSS
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#chatbot img[src='x']").count() == 0
    assert page.locator("#chatbot script").count() == 0
    assert rows(tiny_app.db_path, "SELECT count(*) AS n FROM messages WHERE content = ?", (XSS,)) == [{"n": 1}]


TRACKER = "See ![pixel](http://127.0.0.1:9/p.png) and [your prize](http://evil.example/x) at www.evil.example now"


def test_markdown_images_and_links_never_load_or_link_to_other_hosts(page, tiny_app):
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    send_chat(page, TRACKER, 1)
    page.wait_for_timeout(300)
    shot(page, "08b-links")
    chat = page.locator("#chatbot")
    assert chat.locator("img[src*='p.png']").count() == 0
    assert chat.locator("a[href*='evil.example']").count() == 0
    assert not [u for u in requests if "127.0.0.1:9" in u or "evil.example" in u]
    text = page.locator("#chatbot [data-testid='user']").first.inner_text()
    assert "http://evil.example/x" in text and "p.png" in text  # still readable, as plain text


def test_bad_input_shows_a_readable_error_keeps_the_chat_and_writes_nothing(page, tiny_app):
    send_chat(page, "A first message", 1)
    before = rows(tiny_app.db_path, "SELECT count(*) AS n FROM messages")
    too_long = "x" * 4001
    page.fill("#chat-input textarea", too_long)
    page.press("#chat-input textarea", "Enter")
    page.get_by_text("Your message is 4,001 characters long; the limit is 4,000. Please shorten it.").wait_for()
    page.wait_for_timeout(700)  # let the toast finish fading in for the screenshot
    shot(page, "09-error")
    assert rows(tiny_app.db_path, "SELECT count(*) AS n FROM messages") == before
    # The conversation stays visible (no "Error" overlay over the Chatbot) and the typed text is kept for editing.
    chat_text = page.inner_text("#chatbot")
    assert "A first message" in chat_text and "written by base" in chat_text and "Error" not in chat_text
    assert page.locator("#chatbot .error").count() == 0
    assert page.input_value("#chat-input textarea") == too_long
    assert bot_messages(page).count() == 1


def test_delete_my_data_from_the_data_tab(page, tiny_app):
    send_chat(page, "Something only I said", 1)
    assert rows(
        tiny_app.db_path, "SELECT count(*) AS n FROM messages WHERE content = ?", ("Something only I said",)
    ) == [{"n": 1}]
    page.get_by_role("tab", name="Data").click()
    page.click("#delete-my-data")
    page.get_by_text("Tick the box first").wait_for()  # nothing happens without the checkbox
    shot(page, "10-delete-refused")
    page.get_by_label("Delete all my conversations and votes (cannot be undone)").check()
    page.click("#delete-my-data")
    page.get_by_text("Deleted 1 conversation(s) with 2 message(s)").wait_for()
    shot(page, "10-deleted")
    assert rows(
        tiny_app.db_path, "SELECT count(*) AS n FROM messages WHERE content = ?", ("Something only I said",)
    ) == [{"n": 0}]
