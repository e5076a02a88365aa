"""What every tab shares: showing text safely, turning service errors into toasts, who the voter is, settings.

Knows Gradio's request and error types and the Service's error classes; knows no tab's layout.
"""

from __future__ import annotations

import hmac
import html
import os
import re
import uuid
from collections.abc import Callable, Iterator

import gradio as gr

from rlhf_live.config import Config
from rlhf_live.learning.trainer import RoundInProgress
from rlhf_live.logs import refusal
from rlhf_live.serving.callers import Caller
from rlhf_live.serving.service import USER_ERRORS, Service
from rlhf_live.serving.settings import GenerationSettings

LIKE = {"up": "Like", "down": "Dislike"}
"""Store thumbs -> the Chatbot's feedback labels."""
PRIVATE = {"api_visibility": "private"}
"""UI handlers stay off the API page (still reachable through the queue protocol: permissions live in handlers)."""


# Anything a browser would fetch or follow: scheme URLs, www. hosts, bare domains with a common TLD, e-mail addresses.
_U = r"[^\s<>\"`]"
_LINKY = re.compile(
    rf"(?i)\b(?:[a-z][a-z0-9+.-]*://{_U}+|(?:mailto|javascript|data|file|tel):{_U}+|www\.{_U}+"
    rf"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+|(?:[\w-]+\.)+(?:com|org|net|io|ai|co|app|dev|info|biz|ru|cn|uk|de|xyz|me"
    rf"|ly|gl|link|site|online)\b{_U}*)"
)


def show(text: str) -> str:
    """What people and the model write, as Markdown that formats but never fetches or links anything."""
    # HTML is escaped (never runs); `[` and `]` are escaped, so no Markdown image or link (inline, reference or
    # footnote) exists; URLs, hosts and e-mail addresses go into code spans, where Markdown's autolinking stops: a
    # tracking pixel or a phishing link in an answer shows as plain text.
    out, last = [], 0
    text = text or ""
    for m in _LINKY.finditer(text):
        out += [_plain(text[last : m.start()]), f"`{m.group(0)}`"]  # a code span shows its text as is
        last = m.end()
    return "".join([*out, _plain(text[last:])])


def _plain(text: str) -> str:
    return html.escape(text, quote=False).replace("[", "\\[").replace("]", "\\]")


def answer_md(text: str, version: str | None) -> str:
    """An answer as Markdown, with the version that wrote it underneath once it is finished."""
    tag = f"\n\n<sub>written by {html.escape(version)}</sub>" if version else ""
    return show(text) + tag


def refused(message: str) -> gr.Error:
    """The gr.Error for a refused request: the person reads `message`; the log gets one line, not a traceback."""
    # Gradio prints the traceback of every error a handler raises unless print_exception is off; for refused input
    # (an empty message, a limit) that was ~39 lines per request.
    refusal(message)
    return gr.Error(message, print_exception=False)


class UserError:
    """Turn a service error into the gr.Error a person reads (use as `with UserError():` inside handlers)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, (*USER_ERRORS, RoundInProgress)):
            raise refused(str(exc)) from None
        return False  # anything else is a real error: Gradio prints its traceback


def started(start: Callable[[], Iterator]) -> tuple[Iterator, object]:
    """The stream `start()` returns and its first update; a refusal at the start is a gr.Error."""
    with UserError():  # the service checks the request when the first update is asked for
        stream = start()
        return stream, next(stream)


def client_of(client: dict | None, request: gr.Request) -> dict:
    """This browser's stored value with its id set (the page session's id until the page load has stored one)."""
    # A message sent before the page load's handler has answered carries no id yet. Both then use the session hash,
    # whichever runs first, so the conversation stays this browser's after a reload (it was lost that way).
    value = dict(client or {})
    if not value.get("id"):
        value["id"] = request.session_hash or uuid.uuid4().hex
    return value


def voter_of(service: Service, client: dict | None, request: gr.Request, profile=None) -> str:
    """Who votes: the signed-in Hugging Face user name, else this browser's (or API session's) random id."""
    return caller_of(service, client, request, profile).voter


def caller_of(service: Service, client: dict | None, request: gr.Request, profile=None) -> Caller:
    """Who makes this request: the voter (as voter_of), and the source (signed-in account, else network address)."""
    # A signed-in person's votes follow them across devices; browser tabs keep their id in localStorage (it survives
    # reloads) and API clients have their session.
    # request.client.host is the peer as uvicorn's ProxyHeadersMiddleware resolved it: X-Forwarded-For counts only
    # when the peer is one of Config.trusted_proxies (serve() sets FORWARDED_ALLOW_IPS), so a client's own header
    # is ignored off a Space and only the Space proxy's hop is believed on one.
    key = (client or {}).get("id") or request.session_hash or ""
    username = getattr(profile, "username", None) or getattr(request, "username", None)
    address = getattr(getattr(request, "client", None), "host", None) or ""
    return service.caller(key, address, username)


def on_space() -> bool:
    """Running as a Hugging Face Space (which sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def admin_users(cfg: Config) -> set[str]:
    """Hugging Face user names with the admin controls: Config.admin_users, plus the Space's owner on a Space."""
    names = {n.strip() for n in cfg.admin_users.split(",") if n.strip()}
    owner = os.environ.get("SPACE_AUTHOR_NAME", "") if on_space() else ""
    return names | ({owner} if owner else set())


def settings_from(cfg: Config, system_prompt, temperature, top_p, max_new_tokens) -> GenerationSettings:
    """Generation settings from the Chat tab's Settings controls."""
    return GenerationSettings.from_config(
        cfg,
        system_prompt=system_prompt,
        temperature=float(temperature),
        top_p=float(top_p),
        max_new_tokens=int(max_new_tokens),
    )


def chat_view(turns: list[dict]) -> tuple[list[dict], list[str | None]]:
    """Store turns -> Chatbot messages and the thumbs of each assistant message."""
    messages, thumbs = [], []
    for t in turns:
        if t["role"] == "user":
            messages.append({"role": "user", "content": show(t["content"])})
        elif t["role"] == "assistant":
            messages.append({"role": "assistant", "content": answer_md(t["content"], t.get("adapter_version"))})
            thumbs.append(LIKE.get(t.get("feedback") or ""))
    return messages, thumbs


def chat_state(conversation_id: str = "", ids: list[str] | None = None, leaf: str | None = None) -> dict:
    """The Chat tab's per-browser state: the conversation, the id of each shown message, the current leaf."""
    return {"conversation_id": conversation_id, "ids": list(ids or []), "leaf": leaf}


def require_admin(cfg: Config, token, profile=None) -> None:
    """Raise the error a person reads unless `token` is the admin token or the signed-in user is an admin."""
    # The token is compared in constant time; admins are the Space's owner and Config.admin_users; with neither
    # configured, nobody is.
    # Checked inside each handler: hiding a control does not stop the browser's queue protocol from calling it.
    if cfg.admin_token and hmac.compare_digest(str(token or "").encode(), cfg.admin_token.encode()):
        return
    if getattr(profile, "username", None) in admin_users(cfg):
        return
    raise refused("Admin token required (or sign in as the Space's owner): this control is for the app's owner.")
