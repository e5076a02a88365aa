"""The Chat tab: a conversation with streamed answers, 👍/👎 with an optional reason, retry, undo, new, settings.

Knows the Chat tab's components and handlers and the browser state that keeps a conversation across reloads; knows
nothing of the other tabs (Compare reads the settings and the conversation from `ChatTab`).
"""

from __future__ import annotations

import itertools
import time

import gradio as gr

from rlhf_live.config import Config
from rlhf_live.serving.samplers import coalesced
from rlhf_live.serving.service import USER_ERRORS, Service
from rlhf_live.ui.common import (
    PRIVATE,
    UserError,
    answer_md,
    caller_of,
    chat_state,
    chat_view,
    client_of,
    refused,
    settings_from,
    show,
    started,
    voter_of,
)

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
            show_label=False,  # the label and the toolbar sat on top of the first message
            height=480,
            feedback_options=("Like", "Dislike"),
            allow_tags=False,
            buttons=["copy"],  # no "share" (it did nothing here) and no "copy all" in the corner
            elem_id="chatbot",
            placeholder="Ask anything. Rate answers with 👍 / 👎 to teach the model.",
        )
        with gr.Row(visible=False, elem_id="answer-pager") as self.pager:
            self.prev_answer = gr.Button("◀ Earlier answer", size="sm", scale=0, elem_id="answer-prev")
            self.pager_note = gr.Markdown("", elem_id="answer-pager-note")
            self.next_answer = gr.Button("Later answer ▶", size="sm", scale=0, elem_id="answer-next")
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
        pager = [self.pager, self.pager_note, self.prev_answer, self.next_answer]
        chat_io = (
            [self.box, self.state, self.client, *self.settings],
            [self.box, self.chatbot, self.state, self.client, *pager],
        )
        self.box.submit(self.respond, *chat_io, **self.generate, **PRIVATE, **quiet)
        self.send.click(self.respond, *chat_io, **self.generate, **PRIVATE, **quiet)
        # Votes one at a time, in the order they were clicked, each answered with what the DB now holds: a double
        # click used to run its two events side by side and leave the page showing the opposite of the DB.
        votes = {"concurrency_limit": 1, "concurrency_id": "votes"}
        like_out = [self.last_vote, self.vote_note, self.chatbot]
        self.chatbot.like(self.on_like, [self.state, self.client], like_out, **votes, **PRIVATE)
        reason_io = ([self.reason, self.last_vote, self.client], [self.reason, self.vote_note])
        self.reason_btn.click(self.add_reason, *reason_io, **PRIVATE)
        retry_io = ([self.state, self.client, *self.settings], [self.chatbot, self.state, self.client, *pager])
        self.retry.click(self.do_retry, *retry_io, **self.generate, **PRIVATE, **quiet)
        view = [self.chatbot, self.state, self.client, *pager]
        self.undo.click(self.do_undo, [self.state, self.client], view, **PRIVATE)
        for button, step in ((self.prev_answer, -1), (self.next_answer, 1)):
            button.click(self._pager(step), [self.state, self.client], view, **PRIVATE)
        new_out = [self.chatbot, self.state, self.client, self.vote_note, *pager]
        self.new.click(self.do_new, [self.client], new_out, **PRIVATE)
        self.chatbot.clear(self.do_new, [self.client], new_out, **PRIVATE)  # the trash icon = New conversation

    # --- handlers ------------------------------------------------------------------------------------------
    HIDDEN_PAGER = (gr.update(visible=False), "", gr.update(), gr.update())
    # While an answer streams only the Chatbot changes; skipping the rest (state, browser state, pager) saves the
    # server and the page a re-render per update (bench/page_stream.py).
    SKIPPED = (gr.skip(),) * 6

    def pager_view(self, voter: str, state: dict) -> tuple:
        """The pager's updates: 'Answer k of n' with ◀ ▶ when the last shown answer has siblings (from Retry)."""
        ids = state.get("ids") or []
        if len(ids) < 2 or not state.get("conversation_id"):
            return self.HIDDEN_PAGER
        siblings = self.service.answers_to(voter, state["conversation_id"], ids[-2])
        if len(siblings) < 2 or ids[-1] not in siblings:
            return self.HIDDEN_PAGER
        k = siblings.index(ids[-1]) + 1
        note = f"Answer {k} of {len(siblings)} to this message (Retry keeps every answer and its vote)"
        prev, nxt = gr.update(interactive=k > 1), gr.update(interactive=k < len(siblings))
        return gr.update(visible=True), note, prev, nxt

    def load(self, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Page load: give the browser an id, and show its saved conversation if it still exists."""
        client_value = client_of(client_value, request)
        voter = voter_of(self.service, client_value, request, profile)
        state, messages, thumbs = chat_state(), [], []
        cid, leaf = client_value.get("conversation_id") or "", client_value.get("leaf") or None
        if cid:
            try:
                turns = self.service.history(voter, cid, leaf)
                if turns and turns[-1]["role"] == "user":  # reloaded mid-answer: show what was written of it
                    answer = self._answer_in_flight(voter, cid, turns[-1]["id"])
                    turns = self.service.history(voter, cid, answer) if answer else turns
                messages, thumbs = chat_view(turns)
                state = chat_state(cid, [t["id"] for t in turns], turns[-1]["id"] if turns else None)
                client_value["leaf"] = state["leaf"] or ""
            except USER_ERRORS:
                client_value["conversation_id"], client_value["leaf"] = "", ""
        return client_value, state, gr.Chatbot(value=messages, feedback_value=thumbs), *self.pager_view(voter, state)

    def _answer_in_flight(self, voter: str, cid: str, message_id: str, wait_s: float = 3.0) -> str | None:
        """The newest answer to `message_id`, waiting briefly for one whose page went away to be recorded."""
        deadline = time.monotonic() + wait_s
        while True:
            answers = self.service.answers_to(voter, cid, message_id)
            if answers or time.monotonic() >= deadline:
                return answers[-1] if answers else None
            time.sleep(0.1)

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
        client_value = client_of(client_value, request)
        who = caller_of(self.service, client_value, request, profile)
        settings = settings_from(self.cfg, sp, temp, tp, mnt)
        messages, thumbs = self._history(who.voter, state, state["leaf"])
        stream, first = started(
            lambda: self.service.chat(
                who, message, state["conversation_id"], parent_id=state["leaf"], settings=settings
            )
        )
        shown = [*messages, {"role": "user", "content": show(message.strip())}, {"role": "assistant", "content": ""}]
        # The browser keeps the conversation from the first update on: a reload mid-answer shows the question and
        # what was written of the answer (recorded as 'cancelled' when the page went away).
        client_value = {**client_value, "conversation_id": first["conversation_id"], "leaf": first["user_message_id"]}
        try:
            for k, last in enumerate(coalesced(itertools.chain([first], stream), self.cfg.stream_interval_s)):
                shown[-1] = self._assistant(last)
                if last["response_id"] is None and k == 0:
                    view = gr.Chatbot(value=shown, feedback_value=[*thumbs, None])
                    yield "", view, state, client_value, *self.HIDDEN_PAGER
                elif last["response_id"] is None:  # only the answer changes: every other output is skipped
                    yield gr.skip(), shown, *self.SKIPPED
        finally:
            stream.close()
        cid = last["conversation_id"]
        ids = [*(state["ids"] if state["conversation_id"] else []), last["user_message_id"], last["response_id"]]
        state = chat_state(cid, ids, last["response_id"])
        client_value = {**client_value, "conversation_id": cid, "leaf": last["response_id"]}
        yield "", gr.Chatbot(value=shown, feedback_value=[*thumbs, None]), state, client_value, *self.HIDDEN_PAGER

    def on_like(
        self, data: gr.LikeData, state, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None
    ):
        """A thumb on an answer (or clearing it); the page then shows the thumbs the DB holds."""
        who = caller_of(self.service, client_value, request, profile)
        voter = who.voter
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(state["ids"]):
            raise refused("That answer is still being written; vote once it is finished.")
        value = "clear" if data.liked == "" else ("up" if data.liked else "down")
        with UserError():
            self.service.feedback(who, state["ids"][index], value)
        _, thumbs = self._history(voter, state, state["leaf"])
        vote = {"response_id": state["ids"][index], "value": value}
        return vote, NOTES[value], gr.update(feedback_value=thumbs)

    def add_reason(self, text, vote, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Attach a reason to the last thumb."""
        if not vote.get("response_id") or vote.get("value") == "clear":
            raise refused("Give an answer a 👍 or 👎 first; the reason goes with that vote.")
        with UserError():
            self.service.feedback(
                caller_of(self.service, client_value, request, profile), vote["response_id"], vote["value"], text
            )
        return "", "Reason saved with your vote."

    def do_retry(
        self, state, client_value, sp, temp, tp, mnt, request: gr.Request, profile: gr.OAuthProfile | None = None
    ):
        """A new answer to the last message, as a sibling of the old one (both stay browsable with the pager)."""
        if not state["ids"] or len(state["ids"]) % 2:
            raise refused("There is no finished answer to retry yet.")
        client_value = client_of(client_value, request)
        who = caller_of(self.service, client_value, request, profile)
        messages, thumbs = self._history(who.voter, state, state["ids"][-2])
        settings = settings_from(self.cfg, sp, temp, tp, mnt)
        stream, first = started(lambda: self.service.retry(who, state["ids"][-1], settings))
        shown = [*messages, {"role": "assistant", "content": ""}]
        try:
            for k, last in enumerate(coalesced(itertools.chain([first], stream), self.cfg.stream_interval_s)):
                shown[-1] = self._assistant(last)
                if last["response_id"] is None and k == 0:
                    view = gr.Chatbot(value=shown, feedback_value=[*thumbs, None])
                    yield view, state, client_value, *self.HIDDEN_PAGER
                elif last["response_id"] is None:
                    yield shown, *self.SKIPPED
        finally:
            stream.close()
        state = {**state, "ids": [*state["ids"][:-1], last["response_id"]], "leaf": last["response_id"]}
        view = gr.Chatbot(value=shown, feedback_value=[*thumbs, None])
        yield view, state, {**client_value, "leaf": last["response_id"]}, *self.pager_view(who.voter, state)

    def _pager(self, step: int):
        def turn(state, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
            """Show the earlier (-1) or later (+1) answer to the last message, with its vote."""
            voter = voter_of(self.service, client_value, request, profile)
            ids = state.get("ids") or []
            if len(ids) < 2:
                raise refused("There is only one answer to this message.")
            siblings = self.service.answers_to(voter, state["conversation_id"], ids[-2])
            k = siblings.index(ids[-1]) + step if ids[-1] in siblings else -1
            if not 0 <= k < len(siblings):
                raise refused("There is no other answer that way.")
            return self._show_leaf(voter, state, client_value, siblings[k], request)

        return turn

    def _show_leaf(self, voter: str, state: dict, client_value: dict, leaf: str, request: gr.Request) -> tuple:
        client_value = client_of(client_value, request)
        turns = self.service.history(voter, state["conversation_id"], leaf)
        messages, thumbs = chat_view(turns)
        state = {**state, "ids": [t["id"] for t in turns], "leaf": leaf}
        view = gr.Chatbot(value=messages, feedback_value=thumbs)
        return view, state, {**client_value, "leaf": leaf}, *self.pager_view(voter, state)

    def do_undo(self, state, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Step back one exchange (the messages stay in the store as another branch)."""
        ids = state["ids"][:-2] if len(state["ids"]) >= 2 else []
        if not ids:
            empty, fresh, client_value, _, *pager = self.do_new(client_value, request)
            return empty, fresh, client_value, *pager
        voter = voter_of(self.service, client_value, request, profile)
        return self._show_leaf(voter, state, client_value, ids[-1], request)

    def do_new(self, client_value, request: gr.Request):
        """Start an empty conversation (also the Chatbot's trash icon)."""
        empty = gr.Chatbot(value=[], feedback_value=[])
        client_value = {**client_of(client_value, request), "conversation_id": "", "leaf": ""}
        return empty, chat_state(), client_value, "", *self.HIDDEN_PAGER

    def show_pair_choice(self, pair: dict, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Continue in Chat from the answer chosen in Compare."""
        chosen = pair["a"] if pair.get("choice") == "A" else pair["b"]
        voter = voter_of(self.service, client_value, request, profile)
        turns = self.service.history(voter, pair["conversation_id"], chosen["response_id"])
        messages, thumbs = chat_view(turns)
        state = chat_state(pair["conversation_id"], [t["id"] for t in turns], chosen["response_id"])
        client_value = {
            **client_of(client_value, request),
            "conversation_id": pair["conversation_id"],
            "leaf": chosen["response_id"],
        }
        return gr.Chatbot(value=messages, feedback_value=thumbs), state, client_value
