"""What a person meets on the Training and Data tabs, in a real browser (Playwright + Chromium, tiny model).

The app runs with --no-train and follows its DB (follow_check_s 1 s); a test makes a version live the way a trainer
process does (an adapter folder plus a 'live' row), and the page has to notice by itself: the Training tab's status
changes without a click and a banner says so once. The Data tab gives a visitor their own data and no operator text.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from apphelpers import app_config, rows, run_app
from test_browser import ARGS, send_chat, shot

from rlhf_live.store import Store

pytestmark = pytest.mark.browser

NOTICE_S = 20_000  # ms: the follower checks every second, the page every 5 s
OPERATOR_TEXT = ("--admin-token", "rlhf-live export", "rlhf-live train", "--no-train", "train --once", "Admin token")


@pytest.fixture(scope="module")
def dash_app(chromium_path, tiny_lm_dir, tmp_path_factory):
    with run_app(tiny_lm_dir, tmp_path_factory.mktemp("dash-app") / "data", extra=("--follow-check-s", "1")) as app:
        yield app


@pytest.fixture(scope="module")
def chromium_path():
    from test_browser import CHROMIUM

    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make browser`)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium_path), args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def adapter(tiny_lm_dir, tmp_path_factory) -> Path:
    """A LoRA adapter folder for the tiny model (fresh: it answers as the base does)."""
    from rlhf_live.config import Config
    from rlhf_live.serving.policy import Policy

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    cfg = Config(model=str(tiny_lm_dir), load_in_4bit=False, compute_dtype="float32", lora_r=4, lora_alpha=8)
    Policy.from_config(cfg).model.save_pretrained(folder)
    return folder


def publish(app, adapter: Path) -> tuple[str, int]:
    """Make the next version live in the app's data dir, trained (as PPO) on every vote so far: (version, votes)."""
    store = Store(app.db_path)
    try:
        version = store.next_version()
        path = app.data_dir / "adapters" / version
        shutil.copytree(adapter, path)
        live = store.live_adapter()
        mark = store.watermark()
        metrics = {"learner": "ppo", "watermark": mark}
        store.add_adapter(version, str(path), parent=live and live["version"], status="live", metrics=metrics)
        return version, store.votes_between(0, mark)
    finally:
        store.close()


def new_page(browser, app):
    """A fresh browser (its own localStorage, so its own voter) on the app, with JavaScript errors collected."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(app.url)
    page.wait_for_selector("#chat-input textarea")
    page.wait_for_timeout(1000)  # the page's first check records what is live (that is not news to this browser)
    return page


@pytest.fixture
def pages(browser, dash_app):
    opened = []
    yield lambda: opened.append(new_page(browser, dash_app)) or opened[-1]
    for page in opened:
        errors = page.errors
        page.context.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


def thumb_up_last(page) -> None:
    page.locator("#chatbot button[aria-label='Like']").last.click()
    page.wait_for_function("() => document.querySelector('#vote-note').innerText.includes('recorded')")


def test_the_training_tab_updates_itself_when_a_version_goes_live(pages, dash_app, adapter):
    page = pages()
    page.get_by_role("tab", name="Training").click()
    page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Live:')")
    before = page.inner_text("#train-status")
    assert page.get_by_role("button", name="Refresh").count() == 0
    shot(page, "dash-01-training-before")
    version, votes = publish(dash_app, adapter)
    page.wait_for_function(
        "v => document.querySelector('#train-status').innerText.includes('Live: ' + v + ' since')",
        arg=version,
        timeout=NOTICE_S,
    )
    after = page.inner_text("#train-status")
    assert after != before
    live = re.escape(f"Live: {version} since ") + r"\d{4}-\d\d-\d\d \d\d:\d\d UTC, just now, trained on "
    pattern = r"Now: training runs separately from this page; (no new votes since the last round yet|\d+ new votes? "
    pattern += r"since the last round (are|is) waiting for the next round)\.\s+" + live + rf"{votes} votes?\."
    assert re.fullmatch(pattern, after.strip()), after
    page.wait_for_function(
        "v => document.querySelector('#versions').innerText.includes(v)", arg=version, timeout=NOTICE_S
    )
    shot(page, "dash-02-training-after")
    table = page.inner_text("#versions")
    assert re.search(rf"{version}\s+live\s+ppo\s+\S+\s+\d{{4}}-\d\d-\d\d \d\d:\d\d UTC", table), table
    assert "+00:00" not in table


def test_the_training_tab_polls_only_while_it_is_open(pages, dash_app):
    config = app_config(dash_app.url)
    (timer,) = [c["id"] for c in config["components"] if c["type"] == "timer" and c["props"].get("active") is False]
    (tick,) = [d["id"] for d in config["dependencies"] if [timer, "tick"] in d["targets"]]
    page = pages()
    sent: list[float] = []
    page.on(
        "request",
        lambda r: sent.append(time.monotonic()) if f'"fn_index":{tick},' in (r.post_data or "") else None,
    )
    page.wait_for_timeout(6000)
    assert sent == []  # on Chat: the Training tab's timer is off
    page.get_by_role("tab", name="Training").click()
    page.wait_for_timeout(11_000)
    assert len(sent) >= 2
    page.get_by_role("tab", name="Chat").click()
    page.wait_for_timeout(500)
    ticks = len(sent)
    page.wait_for_timeout(6000)
    assert len(sent) == ticks


def test_a_new_version_is_announced_once_per_browser_with_yours_included_only_for_voters(pages, dash_app, adapter):
    voter, other = pages(), pages()
    send_chat(voter, "Teach the model something", 1)
    thumb_up_last(voter)
    for page in (voter, other):
        assert not page.locator("#new-version").is_visible()
    version, votes = publish(dash_app, adapter)
    for page in (voter, other):
        page.wait_for_selector("#new-version", state="visible", timeout=NOTICE_S)
    plural = "s" if votes != 1 else ""
    said = f"🆕 {version} is live: trained on {votes} vote{plural}"
    tail = f". Its answers are marked “written by {version}”."
    assert voter.inner_text("#new-version-text").strip() == f"{said}, yours included{tail}"
    assert other.inner_text("#new-version-text").strip() == f"{said}{tail}"
    shot(voter, "dash-03-new-version-banner")
    assert "written by " + version in send_chat(voter, "And now?", 2)
    other.click("#new-version-ok")
    other.wait_for_selector("#new-version", state="hidden")
    # Once per browser: after a reload (two checks later) it does not come back.
    voter.reload()
    voter.wait_for_selector("#chat-input textarea")
    voter.wait_for_timeout(11_000)
    assert not voter.locator("#new-version").is_visible()


def test_download_my_data_gives_only_this_browsers_data(pages, dash_app, tmp_path):
    alice, bob = pages(), pages()
    send_chat(alice, "Alice asks about apples", 1)
    thumb_up_last(alice)
    send_chat(bob, "Bob asks about pears", 1)
    alice.get_by_role("tab", name="Data").click()
    alice.click("#download-my-data")
    link = alice.locator("#my-data-file a").first
    link.wait_for(timeout=20_000)
    shot(alice, "dash-04-data-download")
    with alice.expect_download() as got:
        link.click()
    data = json.loads(Path(got.value.path()).read_text())
    (conv,) = rows(
        dash_app.db_path,
        "SELECT c.id, c.session_id FROM conversations c JOIN messages m ON m.conversation_id = c.id"
        " WHERE m.content = 'Alice asks about apples'",
    )
    assert data["voter"] == conv["session_id"]
    assert [c["id"] for c in data["conversations"]] == [conv["id"]]
    stored = rows(
        dash_app.db_path, "SELECT content FROM messages WHERE conversation_id = ? ORDER BY rowid", (conv["id"],)
    )
    assert [m["content"] for m in data["conversations"][0]["messages"]] == [m["content"] for m in stored]
    answer = data["conversations"][0]["messages"][1]["id"]
    assert [(t["response_id"], t["value"]) for t in data["thumbs"]] == [(answer, "up")]
    assert data["comparisons"] == []
    assert "Bob" not in json.dumps(data)
    # After "Delete my data" the download is gone from the page and a new one is empty.
    alice.get_by_label("Delete all my conversations and votes (cannot be undone)").check()
    alice.click("#delete-my-data")
    alice.get_by_text("Deleted 1 conversation(s) with 2 message(s), 1 thumb(s)").wait_for()
    assert alice.locator("#my-data-file").is_hidden()
    alice.click("#download-my-data")
    alice.locator("#my-data-file a").first.wait_for(timeout=20_000)
    with alice.expect_download() as got:
        alice.locator("#my-data-file a").first.click()
    emptied = json.loads(Path(got.value.path()).read_text())
    assert (emptied["voter"], emptied["conversations"], emptied["thumbs"]) == (conv["session_id"], [], [])


def test_visitors_see_what_is_kept_about_them_and_no_operator_text(pages):
    page = pages()
    for tab in ("Chat", "Compare", "Training", "Data"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        text = page.inner_text("body")
        assert not [t for t in OPERATOR_TEXT if t in text], (tab, text)
    shot(page, "dash-05-data")
    about = page.inner_text("#data-about")
    for kept in ("Your conversations:", "Your votes:", "a salted hash", "No IP address", "Download my data"):
        assert kept in about
    assert page.inner_text("#data-summary").startswith("All visitors together: ")


def test_an_admin_sees_the_sources_of_a_public_deployment_and_bans_one(browser, tiny_lm_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = Store(data / "rlhf_live.db")
    for source, n in (("s1attacker0000", 3), ("s2honest00000", 1)):
        for i in range(n):
            cid = store.new_conversation(f"v-{source}-{i}")
            q = store.add_message(cid, "user", "hi")
            a = store.add_message(cid, "assistant", "hello", parent_id=q, adapter_version="base")
            store.record_feedback(a, f"v-{source}-{i}", "up", session_id=f"v-{source}-{i}", source=source)
    store.flag_source("s1attacker0000", votes=3, log_odds=6.5, agree=0.1, at_vote=4)
    store.close()
    extra = ("--public", "--admin-token", "secret-token")
    with run_app(tiny_lm_dir, data, extra=extra) as app:
        page = new_page(browser, app)
        page.get_by_role("tab", name="Training").click()
        page.wait_for_function("() => document.querySelector('#train-status')?.innerText.includes('Left out')")
        assert "1 source flagged for voting against everyone else" in page.inner_text("#train-status")
        page.get_by_text("Admin", exact=True).click()
        page.get_by_label("Admin token").fill("secret-token")
        page.get_by_role("button", name="Show sources").click()
        page.wait_for_selector("#sources table")
        table = page.inner_text("#sources")
        assert "s1attacker00" in table and "flagged" in table and "+6.5" in table and "75%" in table
        page.get_by_label("Source (its first 12 characters or more)").fill("s2honest00000")
        page.get_by_role("button", name="Ban").click()
        page.wait_for_function("() => document.body.innerText.includes('is banned')")
        page.wait_for_function("() => document.querySelector('#sources').innerText.includes('banned')")
        assert "+0.0" not in page.inner_text("#sources")  # an admin's ban carries no test evidence: "–"
        shot(page, "dash-06-admin-sources")
        assert page.errors == []
        page.context.close()
    assert rows(data / "rlhf_live.db", "SELECT source, status FROM sources ORDER BY source") == [
        {"source": "s1attacker0000", "status": "flagged"},
        {"source": "s2honest00000", "status": "banned"},
    ]
