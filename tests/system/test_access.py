"""Access through the browser's own queue protocol: admin actions need the token on the server, not just hiding."""

from __future__ import annotations

import pytest
from apphelpers import app_config, fn_index_of, raw_queue_call, shared_tiny_app
from gradio_client import Client


@pytest.fixture(scope="module")
def tiny_app(request, tiny_lm_dir, tmp_path_factory):
    return shared_tiny_app(request, tiny_lm_dir, tmp_path_factory)


def test_exporting_everyones_data_needs_the_admin_token_even_through_the_raw_queue(tiny_app):
    Client(tiny_app.url, verbose=False).predict("A secret of mine", "", api_name="/chat")
    config = app_config(tiny_app.url)
    export = fn_index_of(config, "Prepare download")
    done = raw_queue_call(tiny_app.url, export, ["preference", ""])  # format, no token
    assert done["success"] is False
    assert "admin token" in done["output"]["error"].lower()
    done = raw_queue_call(tiny_app.url, export, ["preference", "wrong-token"])
    assert done["success"] is False


def test_admin_controls_refuse_a_wrong_token_through_the_raw_queue(tiny_app):
    config = app_config(tiny_app.url)
    for label in ("Train now", "Roll back"):
        done = raw_queue_call(tiny_app.url, fn_index_of(config, label), ["guess", "v0001"])
        assert done["success"] is False and "admin token" in done["output"]["error"].lower()


def test_require_admin_accepts_only_the_configured_token():
    import gradio as gr

    from rlhf_live.config import Config
    from rlhf_live.ui.common import require_admin

    require_admin(Config(admin_token="s3cret"), "s3cret")
    for cfg, token in ((Config(admin_token="s3cret"), "s3cre"), (Config(admin_token="s3cret"), None), (Config(), "")):
        with pytest.raises(gr.Error, match="Admin token required"):
            require_admin(cfg, token)


def test_on_a_space_the_signed_in_owner_is_admin_and_nobody_else(monkeypatch):
    import gradio as gr

    from rlhf_live.config import Config
    from rlhf_live.ui.common import require_admin

    def person(name: str) -> gr.OAuthProfile:
        return gr.OAuthProfile({"preferred_username": name, "name": name, "profile": "", "picture": ""})

    monkeypatch.setenv("SPACE_ID", "alice/rlhf-live")
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "alice")
    require_admin(Config(), "", person("alice"))
    require_admin(Config(admin_users="bob, carol"), "", person("carol"))
    for profile in (person("mallory"), None):  # a signed-in non-owner, an anonymous visitor
        with pytest.raises(gr.Error, match="Admin token required"):
            require_admin(Config(), "", profile)
    monkeypatch.delenv("SPACE_ID")  # not on a Space: SPACE_AUTHOR_NAME means nothing
    with pytest.raises(gr.Error, match="Admin token required"):
        require_admin(Config(), "", person("alice"))


def test_a_signed_in_voter_is_the_same_voter_on_every_device(tiny_cfg):
    import gradio as gr

    from rlhf_live.serving.policy import Policy
    from rlhf_live.serving.service import Service
    from rlhf_live.store import Store
    from rlhf_live.ui.common import voter_of

    class Req:
        def __init__(self, session):
            self.session_hash, self.username = session, None

    service = Service(Policy.from_config(tiny_cfg), Store(tiny_cfg.db_path), tiny_cfg)
    alice = gr.OAuthProfile({"preferred_username": "alice", "name": "", "profile": "", "picture": ""})
    laptop = voter_of(service, {"id": "laptop-browser"}, Req("s1"), alice)
    phone = voter_of(service, {"id": "phone-browser"}, Req("s2"), alice)
    anonymous = voter_of(service, {"id": "laptop-browser"}, Req("s1"))
    assert laptop == phone != anonymous and "alice" not in laptop  # salted: the name itself is not stored


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("![p](http://x.example/p.png)", "!\\[p\\](`http://x.example/p.png)`"),
        ("[prize](https://evil.com/a?b=1)", "\\[prize\\](`https://evil.com/a?b=1)`"),
        ("go to www.evil.example or evil.com/p", "go to `www.evil.example` or `evil.com/p`"),
        ("mail me@evil.com", "mail `me@evil.com`"),
        ("<b>x</b> & 3.14 in model.py: ok", "&lt;b&gt;x&lt;/b&gt; &amp; 3.14 in model.py: ok"),
        ("**bold**, 1. lists and `code`", "**bold**, 1. lists and `code`"),
    ],
)
def test_shown_text_formats_but_never_links_or_fetches(text, shown):
    from rlhf_live.ui.common import show

    assert show(text) == shown


def test_nobody_votes_on_another_persons_pair_or_answer_through_the_raw_queue(tiny_app):
    from apphelpers import rows

    owner = Client(tiny_app.url, verbose=False)
    pair = owner.predict("Which fruit is best?", "", api_name="/compare")
    answer = owner.predict("Hello there", "", api_name="/chat")
    config = app_config(tiny_app.url)
    stranger = {"id": "a-stranger", "conversation_id": "", "leaf": ""}
    done = raw_queue_call(
        tiny_app.url, fn_index_of(config, "👈 A is better"), [{"pair_id": pair["pair_id"]}, "", stranger]
    )
    # Gradio keeps gr.State on the server: the pair the stranger sends is ignored, their own session has none.
    assert done["success"] is False and done["output"]["error"] == "Get two answers first."
    assert rows(tiny_app.db_path, "SELECT choice FROM comparisons WHERE id = ?", (pair["pair_id"],)) == [
        {"choice": None}
    ]
    # Likewise the thumbs handler: the answer ids come from the stranger's own (empty) chat state.
    like = {"index": 0, "value": "x", "liked": True}
    state = {"conversation_id": answer["conversation_id"], "ids": [answer["response_id"]], "leaf": None}
    done = raw_queue_call(tiny_app.url, fn_index_of(config, "Chat", event="like"), [state, stranger], event_data=like)
    assert done["success"] is False and "still being written" in done["output"]["error"]
    assert rows(
        tiny_app.db_path, "SELECT count(*) AS n FROM feedback WHERE response_id = ?", (answer["response_id"],)
    ) == [{"n": 0}]


def test_a_space_without_persistent_storage_says_so(tmp_path, monkeypatch):
    from rlhf_live.config import Config
    from rlhf_live.ui import storage_is_ephemeral

    cfg = Config(data_dir=str(tmp_path / "data"))
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert storage_is_ephemeral(cfg) is False  # not on a Space: nothing to say
    monkeypatch.setenv("SPACE_ID", "someone/rlhf-live")
    assert storage_is_ephemeral(cfg) is True
