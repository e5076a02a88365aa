"""The Gradio app: Chat (thumbs), Compare (A/B), Training dashboard, Data; plus the named HTTP API endpoints.

Knows Gradio components and events (the only module that imports gradio); every request is delegated to Service.
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import tempfile
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd

from .config import Config
from .policy import GenerationSettings, Policy
from .service import COMPARE_MODES, USER_ERRORS, Service
from .store import Store

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS_FILE = ASSETS / "style.css"
LIKE = {"up": "Like", "down": "Dislike"}
EXPORT_FORMATS = ("preference", "kto", "conversations")


def _show(text: str) -> str:
    """Escape HTML so what people and the model write is shown as text, never run as markup."""
    return html.escape(text or "", quote=False)


def _answer_md(text: str, version: str | None) -> str:
    tag = f"\n\n<sub>written by {html.escape(version)}</sub>" if version else ""
    return _show(text) + tag


class _Err:
    """Turn a service error into the gr.Error a person reads (raised inside handlers)."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and isinstance(exc, USER_ERRORS):
            raise gr.Error(str(exc)) from None
        return False


def _voter(service: Service, client: dict | None, request: gr.Request) -> str:
    """Browser tabs carry a random id in localStorage (survives reloads); API clients use their session."""
    key = (client or {}).get("id") or request.session_hash or ""
    return service.voter(key, getattr(request, "username", None))


def _settings(cfg: Config, system_prompt, temperature, top_p, max_new_tokens) -> GenerationSettings:
    return GenerationSettings.from_config(
        cfg,
        system_prompt=system_prompt,
        temperature=float(temperature),
        top_p=float(top_p),
        max_new_tokens=int(max_new_tokens),
    )


def _chat_view(turns: list[dict]) -> tuple[list[dict], list[str | None]]:
    """Store turns -> Chatbot messages and the thumbs of each assistant message."""
    messages, thumbs = [], []
    for t in turns:
        if t["role"] == "user":
            messages.append({"role": "user", "content": _show(t["content"])})
        elif t["role"] == "assistant":
            messages.append({"role": "assistant", "content": _answer_md(t["content"], t.get("adapter_version"))})
            thumbs.append(LIKE.get(t.get("feedback") or ""))
    return messages, thumbs


def build(service: Service, cfg: Config) -> gr.Blocks:
    """The whole app around a Service."""
    gen_limit = {"concurrency_limit": cfg.generation_concurrency, "concurrency_id": "generate"}
    private = {"api_visibility": "private"}

    with gr.Blocks(title="rlhf-live") as demo:
        # A stable secret (derived from the DB's salt) keeps browsers' saved conversations readable after a restart.
        secret = hashlib.sha256(f"browser-state:{service.store.voter_salt()}".encode()).hexdigest()[:32]
        client = gr.BrowserState(
            {"id": "", "conversation_id": "", "leaf": ""}, storage_key="rlhf_live_client", secret=secret
        )
        # Chat state: conversation id, the id of each shown message (parallel to the Chatbot), the current leaf.
        chat_state = gr.State({"conversation_id": "", "ids": [], "leaf": None})
        gr.Markdown(
            "# rlhf-live\nChat with a small model that learns from your votes: 👍/👎 its answers, or pick the "
            "better of two in **Compare**. A trainer turns votes into a reward model and improves the model with PPO."
        )
        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Chat
            with gr.Tab("Chat", id="chat"):
                chatbot = gr.Chatbot(
                    label="Chat",
                    height=480,
                    feedback_options=("Like", "Dislike"),
                    allow_tags=False,
                    elem_id="chatbot",
                    placeholder="Ask anything. Rate answers with 👍 / 👎 to teach the model.",
                )
                with gr.Row():
                    box = gr.Textbox(
                        placeholder="Type a message and press Enter",
                        show_label=False,
                        max_lines=8,
                        scale=8,
                        elem_id="chat-input",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                with gr.Row():
                    retry = gr.Button("🔄 Retry", size="sm")
                    undo = gr.Button("↩️ Undo", size="sm")
                    new = gr.Button("🗒️ New conversation", size="sm")
                with gr.Row():
                    reason = gr.Textbox(
                        placeholder="Why? (optional, for your last 👍/👎)", show_label=False, scale=8, max_length=1000
                    )
                    reason_btn = gr.Button("Add reason", size="sm", scale=1)
                vote_note = gr.Markdown("", elem_id="vote-note")
                with gr.Accordion("Settings", open=False):
                    system_prompt = gr.Textbox(cfg.system_prompt, label="System prompt", lines=2)
                    with gr.Row():
                        temperature = gr.Slider(0.0, 1.5, cfg.temperature, step=0.05, label="Temperature")
                        top_p = gr.Slider(0.05, 1.0, cfg.top_p, step=0.05, label="Top-p")
                        max_new = gr.Slider(16, 1024, cfg.max_new_tokens, step=16, label="Max new tokens")
                last_vote = gr.State({"response_id": "", "value": ""})

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Write a prompt and get two answers side by side. Which one is better? Sources stay hidden "
                    "until you vote."
                )
                with gr.Row():
                    cmp_box = gr.Textbox(placeholder="Your prompt", show_label=False, scale=6, elem_id="cmp-input")
                    cmp_mode = gr.Dropdown(
                        [(label, key) for key, label in COMPARE_MODES.items()],
                        value="samples",
                        label="Compare",
                        scale=3,
                    )
                    cmp_continue = gr.Checkbox(False, label="Continue the chat", scale=2, min_width=200)
                    cmp_go = gr.Button("Get two answers", variant="primary", scale=2, elem_id="cmp-go")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        gr.Markdown("### A")
                        cmp_a = gr.Markdown("", elem_id="cmp-a", elem_classes=["answer-box"])
                    with gr.Column():
                        gr.Markdown("### B")
                        cmp_b = gr.Markdown("", elem_id="cmp-b", elem_classes=["answer-box"])
                with gr.Row():
                    btn_a = gr.Button("👈 A is better", interactive=False, elem_id="choose-a")
                    btn_b = gr.Button("👉 B is better", interactive=False, elem_id="choose-b")
                    btn_tie = gr.Button("🤝 Tie", interactive=False, elem_id="choose-tie")
                    btn_bad = gr.Button("👎 Both bad", interactive=False, elem_id="choose-bad")
                cmp_reason = gr.Textbox(placeholder="Why? (optional)", show_label=False, max_length=1000)
                cmp_reveal = gr.Markdown("", elem_id="cmp-reveal")
                cmp_use = gr.Button("Continue in Chat with the chosen answer", visible=False, size="sm")
                cmp_state = gr.State({})

            # ---------------------------------------------------------------- Training
            with gr.Tab("Training", id="training") as training_tab:
                train_md = gr.Markdown("", elem_id="train-status")
                with gr.Row(visible=False) as curve_row:
                    plot_acc = gr.LinePlot(
                        x="round",
                        y="value",
                        color="metric",
                        title="Learning curve: people's win-rate (Compare) and reward-model accuracy",
                        y_lim=[0, 1],
                        height=280,
                    )
                    plot_rl = gr.LinePlot(
                        x="round", y="value", color="metric", title="KL to the base model and PPO score", height=280
                    )
                gr.Markdown("### Leaderboard: human win-rate per version (Compare votes between versions)")
                board = gr.Dataframe(interactive=False, wrap=True)
                gr.Markdown("### Versions")
                versions_df = gr.Dataframe(interactive=False, wrap=True)
                with gr.Accordion("Admin", open=False, visible=bool(cfg.admin_token)):
                    admin_token = gr.Textbox(label="Admin token", type="password")
                    with gr.Row():
                        train_now = gr.Button("Train now")
                        rollback_to = gr.Textbox(label="Roll back to version (e.g. v0002)", scale=2)
                        rollback = gr.Button("Roll back")
                    admin_note = gr.Markdown("")
                refresh = gr.Button("Refresh", size="sm")

            # ---------------------------------------------------------------- Data
            with gr.Tab("Data", id="data") as data_tab:
                data_md = gr.Markdown("")
                with gr.Row():
                    fmt = gr.Radio(list(EXPORT_FORMATS), value="preference", label="Export format (TRL columns)")
                    export_btn = gr.Button("Prepare download")
                export_file = gr.File(label="Export", interactive=False)

        # ============================================================== handlers: Chat
        def load(client_value, request: gr.Request):
            client_value = dict(client_value or {})
            if not client_value.get("id"):
                client_value["id"] = uuid.uuid4().hex
            voter = _voter(service, client_value, request)
            state = {"conversation_id": "", "ids": [], "leaf": None}
            messages, thumbs = [], []
            cid = client_value.get("conversation_id") or ""
            if cid:
                try:
                    turns = service.history(voter, cid, client_value.get("leaf") or None)
                    messages, thumbs = _chat_view(turns)
                    state = {
                        "conversation_id": cid,
                        "ids": [t["id"] for t in turns],
                        "leaf": turns[-1]["id"] if turns else None,
                    }
                except USER_ERRORS:
                    client_value["conversation_id"], client_value["leaf"] = "", ""
            return client_value, state, gr.Chatbot(value=messages, feedback_value=thumbs)

        demo.load(load, [client], [client, chat_state, chatbot], **private)

        def respond(message, state, client_value, sp, temp, tp, mnt, request: gr.Request):
            voter = _voter(service, client_value, request)
            settings = _settings(cfg, sp, temp, tp, mnt)
            messages, thumbs = (
                _chat_view(service.history(voter, state["conversation_id"], state["leaf"]))
                if state["conversation_id"]
                else ([], [])
            )
            with _Err():
                stream = service.chat(
                    voter, message, state["conversation_id"], parent_id=state["leaf"], settings=settings
                )
                first = next(stream)
            shown = [
                *messages,
                {"role": "user", "content": _show(message.strip())},
                {"role": "assistant", "content": ""},
            ]
            for update in itertools.chain([first], stream):
                shown[-1] = {
                    "role": "assistant",
                    "content": _answer_md(update["text"], update["adapter_version"] if update["response_id"] else None),
                }
                if update["response_id"] is None:
                    yield "", gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value
            cid = update["conversation_id"]
            ids = [
                *(state["ids"] if state["conversation_id"] else []),
                update["user_message_id"],
                update["response_id"],
            ]
            state = {"conversation_id": cid, "ids": ids, "leaf": update["response_id"]}
            client_value = {**client_value, "conversation_id": cid, "leaf": update["response_id"]}
            yield "", gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value

        # A refused message (empty, too long, ...) is explained by the error toast; without this Gradio also covers
        # the whole Chatbot with an "Error" overlay that hides the conversation until it is dismissed. The streamed
        # answer is progress enough.
        quiet = {"show_progress": "hidden", "show_progress_on": [box]}
        chat_io = (
            [box, chat_state, client, system_prompt, temperature, top_p, max_new],
            [box, chatbot, chat_state, client],
        )
        box.submit(respond, *chat_io, **gen_limit, **private, **quiet)
        send.click(respond, *chat_io, **gen_limit, **private, **quiet)

        def on_like(data: gr.LikeData, state, client_value, request: gr.Request):
            voter = _voter(service, client_value, request)
            index = data.index if isinstance(data.index, int) else data.index[0]
            if index >= len(state["ids"]):
                raise gr.Error("That answer is still being written; vote once it is finished.")
            value = "clear" if data.liked == "" else ("up" if data.liked else "down")
            with _Err():
                service.feedback(voter, state["ids"][index], value)
            note = {"up": "👍 recorded. Thank you!", "down": "👎 recorded. Thank you!", "clear": "Vote cleared."}[value]
            return {"response_id": state["ids"][index], "value": value}, note

        chatbot.like(on_like, [chat_state, client], [last_vote, vote_note], **private)

        def add_reason(text, vote, client_value, request: gr.Request):
            if not vote.get("response_id") or vote.get("value") == "clear":
                raise gr.Error("Give an answer a 👍 or 👎 first; the reason goes with that vote.")
            with _Err():
                service.feedback(_voter(service, client_value, request), vote["response_id"], vote["value"], text)
            return "", "Reason saved with your vote."

        reason_btn.click(add_reason, [reason, last_vote, client], [reason, vote_note], **private)

        def do_retry(state, client_value, sp, temp, tp, mnt, request: gr.Request):
            if not state["ids"] or len(state["ids"]) % 2:
                raise gr.Error("There is no finished answer to retry yet.")
            voter = _voter(service, client_value, request)
            turns = service.history(voter, state["conversation_id"], state["ids"][-2])
            messages, thumbs = _chat_view(turns)
            with _Err():
                stream = service.retry(voter, state["ids"][-1], _settings(cfg, sp, temp, tp, mnt))
                first = next(stream)
            shown = [*messages, {"role": "assistant", "content": ""}]
            for update in itertools.chain([first], stream):
                shown[-1] = {
                    "role": "assistant",
                    "content": _answer_md(update["text"], update["adapter_version"] if update["response_id"] else None),
                }
                if update["response_id"] is None:
                    yield gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value
            state = {**state, "ids": [*state["ids"][:-1], update["response_id"]], "leaf": update["response_id"]}
            yield (
                gr.Chatbot(value=shown, feedback_value=[*thumbs, None]),
                state,
                {**client_value, "leaf": update["response_id"]},
            )

        retry.click(
            do_retry,
            [chat_state, client, system_prompt, temperature, top_p, max_new],
            [chatbot, chat_state, client],
            **gen_limit,
            **private,
            **quiet,
        )

        def do_undo(state, client_value, request: gr.Request):
            ids = state["ids"][:-2] if len(state["ids"]) >= 2 else []
            leaf = ids[-1] if ids else None
            if not ids:
                return (
                    gr.Chatbot(value=[], feedback_value=[]),
                    {"conversation_id": "", "ids": [], "leaf": None},
                    {**client_value, "conversation_id": "", "leaf": ""},
                )
            messages, thumbs = _chat_view(
                service.history(_voter(service, client_value, request), state["conversation_id"], leaf)
            )
            return (
                gr.Chatbot(value=messages, feedback_value=thumbs),
                {**state, "ids": ids, "leaf": leaf},
                {**client_value, "leaf": leaf},
            )

        undo.click(do_undo, [chat_state, client], [chatbot, chat_state, client], **private)

        def do_new(client_value):
            return (
                gr.Chatbot(value=[], feedback_value=[]),
                {"conversation_id": "", "ids": [], "leaf": None},
                {**client_value, "conversation_id": "", "leaf": ""},
                "",
            )

        new.click(do_new, [client], [chatbot, chat_state, client, vote_note], **private)

        # ============================================================== handlers: Compare
        # gr.update, not gr.Button(...): a component constructed here, inside the Blocks, would be rendered as a
        # stray "Run" button at the bottom of the page.
        locked = [gr.update(interactive=False)] * 4

        def do_compare(message, mode, cont, state, client_value, sp, temp, tp, mnt, request: gr.Request):
            voter = _voter(service, client_value, request)
            cid = state["conversation_id"] if cont else ""
            with _Err():
                stream = service.compare(
                    voter,
                    message,
                    cid,
                    parent_id=state["leaf"] if cont else None,
                    mode=mode,
                    settings=_settings(cfg, sp, temp, tp, mnt),
                )
                first = next(stream)
            for update in itertools.chain([first], stream):
                if update["pair_id"] is None:
                    yield (
                        _show(update["a"]["text"]),
                        _show(update["b"]["text"]),
                        *locked,
                        "",
                        gr.Button(visible=False),
                        {},
                    )
            yield (
                _show(update["a"]["text"]),
                _show(update["b"]["text"]),
                *[gr.Button(interactive=True)] * 4,
                "",
                gr.Button(visible=False),
                {**update, "message": message},
            )

        cmp_outputs = [cmp_a, cmp_b, btn_a, btn_b, btn_tie, btn_bad, cmp_reveal, cmp_use, cmp_state]
        cmp_inputs = [cmp_box, cmp_mode, cmp_continue, chat_state, client, system_prompt, temperature, top_p, max_new]
        cmp_go.click(do_compare, cmp_inputs, cmp_outputs, **gen_limit, **private)
        cmp_box.submit(do_compare, cmp_inputs, cmp_outputs, **gen_limit, **private)

        def make_choose(choice: str):
            def do_choose(pair, why, client_value, request: gr.Request):
                if not pair.get("pair_id"):
                    raise gr.Error("Get two answers first.")
                with _Err():
                    result = service.choose(_voter(service, client_value, request), pair["pair_id"], choice, why)
                label = {"A": "A is better", "B": "B is better", "tie": "a tie", "both_bad": "both bad"}[choice]
                reveal = (
                    f"**Recorded: {label}.** A was written by **{html.escape(result['a_version'])}**, "
                    f"B by **{html.escape(result['b_version'])}**."
                )
                can_continue = choice in ("A", "B")
                return *locked, reveal, gr.Button(visible=can_continue), {**pair, "choice": choice}, ""

            return do_choose

        for btn, choice in ((btn_a, "A"), (btn_b, "B"), (btn_tie, "tie"), (btn_bad, "both_bad")):
            btn.click(
                make_choose(choice),
                [cmp_state, cmp_reason, client],
                [btn_a, btn_b, btn_tie, btn_bad, cmp_reveal, cmp_use, cmp_state, cmp_reason],
                **private,
            )

        def use_choice(pair, client_value, request: gr.Request):
            chosen = pair["a"] if pair.get("choice") == "A" else pair["b"]
            voter = _voter(service, client_value, request)
            turns = service.history(voter, pair["conversation_id"], chosen["response_id"])
            messages, thumbs = _chat_view(turns)
            state = {
                "conversation_id": pair["conversation_id"],
                "ids": [t["id"] for t in turns],
                "leaf": chosen["response_id"],
            }
            client_value = {**client_value, "conversation_id": pair["conversation_id"], "leaf": chosen["response_id"]}
            return gr.Chatbot(value=messages, feedback_value=thumbs), state, client_value, gr.Tabs(selected="chat")

        cmp_use.click(use_choice, [cmp_state, client], [chatbot, chat_state, client, tabs], **private)

        # ============================================================== handlers: Training and Data
        dash_outputs = [train_md, curve_row, plot_acc, plot_rl, board, versions_df, data_md]
        refresh.click(lambda: _dashboard(service), None, dash_outputs, **private)
        demo.load(lambda: _dashboard(service), None, dash_outputs, **private)
        # Fresh numbers whenever a dashboard tab is opened (otherwise they are as old as the page).
        training_tab.select(lambda: _dashboard(service), None, dash_outputs, **private)
        data_tab.select(lambda: _dashboard(service), None, dash_outputs, **private)

        def admin(action: str):
            def run(token, version):
                if not cfg.admin_token or token != cfg.admin_token:
                    raise gr.Error("Admin token required: this control is for the app's owner.")
                if service.trainer is None:
                    raise gr.Error("Training is not running in this app (started with --no-train).")
                with _Err():
                    msg = service.trainer.request_round() if action == "train" else service.trainer.rollback(version)
                return msg

            return run

        train_now.click(admin("train"), [admin_token, rollback_to], [admin_note], **private)
        rollback.click(admin("rollback"), [admin_token, rollback_to], [admin_note], **private)

        def do_export(kind):
            out = Path(tempfile.mkdtemp(prefix="rlhf-live-export-")) / f"rlhf-live-{kind}.jsonl"
            with _Err():
                service.store.export(kind, out)
            return str(out)

        export_btn.click(do_export, [fmt], [export_file], **private)

        # ============================================================== the HTTP API (gradio_client)
        def api_chat(message: str, conversation_id: str = "", request: gr.Request = None) -> dict:
            """Answer `message` in a new ("") or existing conversation of this client; returns ids and text."""
            with _Err():
                *_, last = service.chat(_voter(service, None, request), message, conversation_id or "")
            return {k: last[k] for k in ("conversation_id", "response_id", "text", "adapter_version")}

        def api_feedback(response_id: str, value: str, reason: str = "", request: gr.Request = None) -> dict:
            """Thumb an answer: value is up, down or clear."""
            with _Err():
                out = service.feedback(_voter(service, None, request), response_id, value, reason)
            return {"ok": out["ok"]}

        def api_compare(message: str, conversation_id: str = "", request: gr.Request = None) -> dict:
            """Two answers of the live model to `message`; vote with /choose."""
            with _Err():
                *_, last = service.compare(_voter(service, None, request), message, conversation_id or "")
            return {"pair_id": last["pair_id"], "a": last["a"], "b": last["b"]}

        def api_choose(pair_id: str, choice: str, reason: str = "", request: gr.Request = None) -> dict:
            """Pick the better answer of a pair: A, B, tie or both_bad (once per pair)."""
            with _Err():
                out = service.choose(_voter(service, None, request), pair_id, choice, reason)
            return {"ok": out["ok"], "a_version": out["a_version"], "b_version": out["b_version"]}

        def api_status() -> dict:
            """Trainer state, live version, counts and last run metrics."""
            return json.loads(json.dumps(service.status(), default=str))

        gr.api(api_chat, api_name="chat", **gen_limit)
        gr.api(api_feedback, api_name="feedback")
        gr.api(api_compare, api_name="compare", **gen_limit)
        gr.api(api_choose, api_name="choose")
        gr.api(api_status, api_name="status")
    return demo


def _learner(version: dict) -> str:
    """Which learner made a version (versions from before the choice existed were PPO's)."""
    return ((version.get("metrics") or {}) if isinstance(version.get("metrics"), dict) else {}).get("learner", "ppo")


def _dashboard(service: Service):
    """Everything the Training and Data tabs show, from one status read."""
    status = service.status()
    trainer = status["trainer"]
    lines = [
        f"**Live version:** `{status['live_version']}`  ·  **Trainer:** {trainer.get('state', 'unknown')}"
        + (f" ({trainer['progress']})" if trainer.get("progress") else ""),
        f"**Votes since the last round:** {status['votes_since_last_round']}",
    ]
    if not trainer.get("running"):
        lines.append(
            "_Training is not running in this app: votes are collected and can be trained on with "
            "`rlhf-live train --once`._"
        )
    if trainer.get("last_error"):
        lines.append(f"**Last training error:** {html.escape(str(trainer['last_error']))}")
    acc_rows, rl_rows = _curve_rows(service.learning_curve())
    votes_left = max(0, status["votes_per_round"] - status["votes_since_last_round"])
    if not acc_rows and not rl_rows:
        lines.append(
            f"**No training round yet.** {votes_left} more vote{'s' if votes_left != 1 else ''} (thumbs or Compare "
            "choices) start the first one; the learning curve appears here after it."
            if trainer.get("running")
            else "**No training round yet.**"
        )
    elif trainer.get("running"):
        lines.append(f"**Next round** after {votes_left} more vote{'s' if votes_left != 1 else ''}.")
    frame = lambda rows: pd.DataFrame(rows or [], columns=["round", "value", "metric"])  # noqa: E731
    versions = pd.DataFrame(
        [
            {**{k: v.get(k) for k in ("version", "status", "parent", "created")}, "learner": _learner(v)}
            for v in status["versions"]
        ]
        or [],
        columns=["version", "status", "learner", "parent", "created"],
    )
    board_rows = service.leaderboard()
    board = pd.DataFrame(board_rows or [], columns=["version", "rating", "lower", "upper", "battles", "win_rate"])
    counts, votes, choices = status["counts"], status["votes"], status["choices"]
    data = (
        f"**Conversations:** {counts['conversations']} · **messages:** {counts['messages']} · "
        f"**thumbs:** 👍 {votes.get('up', 0)} / 👎 {votes.get('down', 0)} (cleared {votes.get('cleared', 0)}) · "
        f"**A/B choices:** " + ", ".join(f"{k} {v}" for k, v in choices.items())
    )
    curve = gr.Row(visible=bool(acc_rows or rl_rows))
    return "\n\n".join(lines), curve, frame(acc_rows), frame(rl_rows), board, versions, data


def _curve_rows(curve: list[dict]) -> tuple[list[dict], list[dict]]:
    """Long-format rows for the two learning-curve plots (a missing value leaves a gap, not a zero)."""
    rates, drift = [], []
    for row in curve:
        for key, rows, name in (
            ("win_rate_vs_base", rates, "people: vs base"),
            ("win_rate_vs_earlier", rates, "people: vs earlier versions"),
            ("reward_accuracy", rates, "reward model accuracy (held-out votes)"),
            ("kl", drift, "KL to base (nats/answer)"),
            ("ppo_score", drift, "PPO score (normalised reward)"),
        ):
            if row.get(key) is not None:
                rows.append({"round": row["round"], "value": float(row[key]), "metric": name})
    return rates, drift


def serve(cfg: Config) -> None:
    """Load the policy and store, start the trainer (unless --no-train) and run the app until interrupted."""
    store = Store.from_config(cfg)
    live = store.live_adapter()
    adapter = cfg.adapter or (live["path"] if live and Path(live["path"]).is_dir() else None)
    policy = Policy.from_config(
        cfg, adapter_path=adapter, version=(live["version"] if live and not cfg.adapter else None)
    )
    trainer = None
    if cfg.train:
        try:
            from .trainer import Trainer
        except ImportError:
            Trainer = None  # noqa: N806
        if Trainer is not None:
            trainer = Trainer(cfg, store, policy)
            trainer.start()
    service = Service(policy, store, cfg, trainer)
    demo = build(service, cfg)
    demo.queue(default_concurrency_limit=cfg.generation_concurrency)
    css = CSS_FILE.read_text() if CSS_FILE.is_file() else None
    demo.launch(server_name=cfg.host, server_port=cfg.port, css=css, theme=gr.themes.Soft())
