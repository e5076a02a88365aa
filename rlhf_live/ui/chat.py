"""The Chat tab: a conversation with streamed answers, 👍/👎 with an optional reason, retry, undo, new, settings.

Knows the Chat tab's components and handlers and the browser state that keeps a conversation across reloads; knows
nothing of the other tabs (Compare reads the settings and the conversation from `ChatTab`).
"""

from __future__ import annotations

import itertools
import uuid

import gradio as gr

from ..config import Config
from ..service import USER_ERRORS, Service
from .common import PRIVATE, UserError, answer_md, chat_state, chat_view, settings_from, show, voter_of

NOTES = {"up": "👍 recorded. Thank you!", "down": "👎 recorded. Thank you!", "clear": "Vote cleared."}


class ChatTab:
    """Builds the Chat tab inside the current gr.Blocks and wires its events."""

    def __init__(self, service: Service, cfg: Config, client: gr.BrowserState, generate: dict):
        self.service, self.cfg, self.client, self.generate = service, cfg, client, generate
        with gr.Tab("Chat", id="chat"):
            self.state = gr.State(chat_state())  # inside the Tab: a component directly in gr.Tabs becomes a tab
            self._layout()
        self._wire()

    def _layout(self) -> None:
        cfg = self.cfg
        self.chatbot = gr.Chatbot(
            label="Chat",
            height=480,
            feedback_options=("Like", "Dislike"),
            allow_tags=False,
            elem_id="chatbot",
            placeholder="Ask anything. Rate answers with 👍 / 👎 to teach the model.",
        )
        with gr.Row():
            self.box = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                max_lines=8,
                scale=8,
                elem_id="chat-input",
            )
            self.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        with gr.Row():
            self.retry = gr.Button("🔄 Retry", size="sm")
            self.undo = gr.Button("↩️ Undo", size="sm")
            self.new = gr.Button("🗒️ New conversation", size="sm")
        with gr.Row():
            self.reason = gr.Textbox(
                placeholder="Why? (optional, for your last 👍/👎)", show_label=False, scale=8, max_length=1000
            )
            self.reason_btn = gr.Button("Add reason", size="sm", scale=1)
        self.vote_note = gr.Markdown("", elem_id="vote-note")
        with gr.Accordion("Settings", open=False):
            self.system_prompt = gr.Textbox(
                cfg.system_prompt, label="System prompt", lines=2, max_length=cfg.max_system_prompt_chars
            )
            with gr.Row():
                self.temperature = gr.Slider(0.0, 1.5, cfg.temperature, step=0.05, label="Temperature")
                self.top_p = gr.Slider(0.05, 1.0, cfg.top_p, step=0.05, label="Top-p")
                self.max_new = gr.Slider(16, 1024, cfg.max_new_tokens, step=16, label="Max new tokens")
        self.last_vote = gr.State({"response_id": "", "value": ""})

    @property
    def settings(self) -> list:
        """The Settings controls, in the order `settings_from` takes them."""
        return [self.system_prompt, self.temperature, self.top_p, self.max_new]

    def _wire(self) -> None:
        # A refused message (empty, too long, ...) is explained by the error toast; without `quiet` Gradio also
        # covers the whole Chatbot with an "Error" overlay that hides the conversation until it is dismissed.
        quiet = {"show_progress": "hidden", "show_progress_on": [self.box]}
        chat_io = (
            [self.box, self.state, self.client, *self.settings],
            [self.box, self.chatbot, self.state, self.client],
        )
        self.box.submit(self.respond, *chat_io, **self.generate, **PRIVATE, **quiet)
        self.send.click(self.respond, *chat_io, **self.generate, **PRIVATE, **quiet)
        self.chatbot.like(self.on_like, [self.state, self.client], [self.last_vote, self.vote_note], **PRIVATE)
        reason_io = ([self.reason, self.last_vote, self.client], [self.reason, self.vote_note])
        self.reason_btn.click(self.add_reason, *reason_io, **PRIVATE)
        retry_io = ([self.state, self.client, *self.settings], [self.chatbot, self.state, self.client])
        self.retry.click(self.do_retry, *retry_io, **self.generate, **PRIVATE, **quiet)
        self.undo.click(self.do_undo, [self.state, self.client], [self.chatbot, self.state, self.client], **PRIVATE)
        self.new.click(self.do_new, [self.client], [self.chatbot, self.state, self.client, self.vote_note], **PRIVATE)

    # --- handlers ------------------------------------------------------------------------------------------
    def load(self, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Page load: give the browser an id, and show its saved conversation if it still exists."""
        client_value = dict(client_value or {})
        if not client_value.get("id"):
            client_value["id"] = uuid.uuid4().hex
        voter = voter_of(self.service, client_value, request, profile)
        state, messages, thumbs = chat_state(), [], []
        cid = client_value.get("conversation_id") or ""
        if cid:
            try:
                turns = self.service.history(voter, cid, client_value.get("leaf") or None)
                messages, thumbs = chat_view(turns)
                state = chat_state(cid, [t["id"] for t in turns], turns[-1]["id"] if turns else None)
            except USER_ERRORS:
                client_value["conversation_id"], client_value["leaf"] = "", ""
        return client_value, state, gr.Chatbot(value=messages, feedback_value=thumbs)

    def _history(self, voter: str, state: dict, leaf: str | None) -> tuple[list[dict], list[str | None]]:
        if not state["conversation_id"]:
            return [], []
        return chat_view(self.service.history(voter, state["conversation_id"], leaf))

    @staticmethod
    def _assistant(update: dict) -> dict:
        """The answer being written; its version is shown once it is finished (has an id)."""
        version = update["adapter_version"] if update["response_id"] else None
        return {"role": "assistant", "content": answer_md(update["text"], version)}

    def respond(
        self,
        message,
        state,
        client_value,
        sp,
        temp,
        tp,
        mnt,
        request: gr.Request,
        profile: gr.OAuthProfile | None = None,
    ):
        """Send: record the message and stream the live version's answer."""
        voter = voter_of(self.service, client_value, request, profile)
        settings = settings_from(self.cfg, sp, temp, tp, mnt)
        messages, thumbs = self._history(voter, state, state["leaf"])
        with UserError():
            stream = self.service.chat(
                voter, message, state["conversation_id"], parent_id=state["leaf"], settings=settings
            )
            first = next(stream)
        shown = [*messages, {"role": "user", "content": show(message.strip())}, {"role": "assistant", "content": ""}]
        for last in itertools.chain([first], stream):
            shown[-1] = self._assistant(last)
            if last["response_id"] is None:
                yield "", gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value
        cid = last["conversation_id"]
        ids = [*(state["ids"] if state["conversation_id"] else []), last["user_message_id"], last["response_id"]]
        state = chat_state(cid, ids, last["response_id"])
        client_value = {**client_value, "conversation_id": cid, "leaf": last["response_id"]}
        yield "", gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value

    def on_like(
        self, data: gr.LikeData, state, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None
    ):
        """A thumb on an answer (or clearing it)."""
        voter = voter_of(self.service, client_value, request, profile)
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(state["ids"]):
            raise gr.Error("That answer is still being written; vote once it is finished.")
        value = "clear" if data.liked == "" else ("up" if data.liked else "down")
        with UserError():
            self.service.feedback(voter, state["ids"][index], value)
        return {"response_id": state["ids"][index], "value": value}, NOTES[value]

    def add_reason(self, text, vote, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Attach a reason to the last thumb."""
        if not vote.get("response_id") or vote.get("value") == "clear":
            raise gr.Error("Give an answer a 👍 or 👎 first; the reason goes with that vote.")
        with UserError():
            self.service.feedback(
                voter_of(self.service, client_value, request, profile), vote["response_id"], vote["value"], text
            )
        return "", "Reason saved with your vote."

    def do_retry(
        self, state, client_value, sp, temp, tp, mnt, request: gr.Request, profile: gr.OAuthProfile | None = None
    ):
        """A new answer to the last message, as a sibling of the old one."""
        if not state["ids"] or len(state["ids"]) % 2:
            raise gr.Error("There is no finished answer to retry yet.")
        voter = voter_of(self.service, client_value, request, profile)
        messages, thumbs = self._history(voter, state, state["ids"][-2])
        with UserError():
            stream = self.service.retry(voter, state["ids"][-1], settings_from(self.cfg, sp, temp, tp, mnt))
            first = next(stream)
        shown = [*messages, {"role": "assistant", "content": ""}]
        for last in itertools.chain([first], stream):
            shown[-1] = self._assistant(last)
            if last["response_id"] is None:
                yield gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value
        state = {**state, "ids": [*state["ids"][:-1], last["response_id"]], "leaf": last["response_id"]}
        view = gr.Chatbot(value=shown, feedback_value=[*thumbs, None])
        yield view, state, {**client_value, "leaf": last["response_id"]}

    def do_undo(self, state, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Step back one exchange (the messages stay in the store as another branch)."""
        ids = state["ids"][:-2] if len(state["ids"]) >= 2 else []
        if not ids:
            return self.do_new(client_value)[:3]
        leaf = ids[-1]
        messages, thumbs = self._history(voter_of(self.service, client_value, request, profile), state, leaf)
        return (
            gr.Chatbot(value=messages, feedback_value=thumbs),
            {**state, "ids": ids, "leaf": leaf},
            {**client_value, "leaf": leaf},
        )

    def do_new(self, client_value):
        """Start an empty conversation."""
        empty = gr.Chatbot(value=[], feedback_value=[])
        return empty, chat_state(), {**client_value, "conversation_id": "", "leaf": ""}, ""

    def show_pair_choice(self, pair: dict, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Continue in Chat from the answer chosen in Compare."""
        chosen = pair["a"] if pair.get("choice") == "A" else pair["b"]
        voter = voter_of(self.service, client_value, request, profile)
        turns = self.service.history(voter, pair["conversation_id"], chosen["response_id"])
        messages, thumbs = chat_view(turns)
        state = chat_state(pair["conversation_id"], [t["id"] for t in turns], chosen["response_id"])
        client_value = {**client_value, "conversation_id": pair["conversation_id"], "leaf": chosen["response_id"]}
        return gr.Chatbot(value=messages, feedback_value=thumbs), state, client_value
