"""The Compare tab: two answers side by side with hidden sources, an A/B/tie/both-bad vote, then the reveal.

Knows the Compare tab's components and handlers; takes the generation settings and the conversation to continue
from the Chat tab (`ChatTab`), and can hand the chosen answer back to it.
"""

from __future__ import annotations

import html
import itertools

import gradio as gr

from ..config import Config
from ..service import COMPARE_MODES, Service
from .chat import ChatTab
from .common import PRIVATE, UserError, settings_from, show, voter_of

LABELS = {"A": "A is better", "B": "B is better", "tie": "a tie", "both_bad": "both bad"}


class CompareTab:
    """Builds the Compare tab inside the current gr.Blocks and wires its events."""

    def __init__(self, service: Service, cfg: Config, chat: ChatTab, tabs: gr.Tabs, generate: dict):
        self.service, self.cfg, self.chat, self.tabs, self.generate = service, cfg, chat, tabs, generate
        with gr.Tab("Compare", id="compare"):
            self._layout()
        self._wire()

    def _layout(self) -> None:
        gr.Markdown(
            "Write a prompt and get two answers side by side. Which one is better? Sources stay hidden until you vote."
        )
        with gr.Row():
            self.box = gr.Textbox(placeholder="Your prompt", show_label=False, scale=6, elem_id="cmp-input")
            modes = [(label, key) for key, label in COMPARE_MODES.items()]
            self.mode = gr.Dropdown(modes, value="samples", label="Compare", scale=3)
            self.cont = gr.Checkbox(False, label="Continue the chat", scale=2, min_width=200)
            self.go = gr.Button("Get two answers", variant="primary", scale=2, elem_id="cmp-go")
        with gr.Row(equal_height=True):
            with gr.Column():
                gr.Markdown("### A")
                self.a = gr.Markdown("", elem_id="cmp-a", elem_classes=["answer-box"])
            with gr.Column():
                gr.Markdown("### B")
                self.b = gr.Markdown("", elem_id="cmp-b", elem_classes=["answer-box"])
        with gr.Row():
            self.buttons = {
                "A": gr.Button("👈 A is better", interactive=False, elem_id="choose-a"),
                "B": gr.Button("👉 B is better", interactive=False, elem_id="choose-b"),
                "tie": gr.Button("🤝 Tie", interactive=False, elem_id="choose-tie"),
                "both_bad": gr.Button("👎 Both bad", interactive=False, elem_id="choose-bad"),
            }
        self.reason = gr.Textbox(placeholder="Why? (optional)", show_label=False, max_length=1000)
        self.reveal = gr.Markdown("", elem_id="cmp-reveal")
        self.use = gr.Button("Continue in Chat with the chosen answer", visible=False, size="sm")
        self.pair = gr.State({})

    def _wire(self) -> None:
        chat = self.chat
        outputs = [self.a, self.b, *self.buttons.values(), self.reveal, self.use, self.pair]
        inputs = [self.box, self.mode, self.cont, chat.state, chat.client, *chat.settings]
        self.go.click(self.do_compare, inputs, outputs, **self.generate, **PRIVATE)
        self.box.submit(self.do_compare, inputs, outputs, **self.generate, **PRIVATE)
        after = [*self.buttons.values(), self.reveal, self.use, self.pair, self.reason]
        for choice, button in self.buttons.items():
            button.click(self._chooser(choice), [self.pair, self.reason, chat.client], after, **PRIVATE)
        self.use.click(
            self.use_choice, [self.pair, chat.client], [chat.chatbot, chat.state, chat.client, self.tabs], **PRIVATE
        )

    # gr.update, not gr.Button(...): a component constructed in a handler inside the Blocks would be rendered as a
    # stray "Run" button at the bottom of the page.
    LOCKED = [gr.update(interactive=False)] * 4

    def do_compare(
        self,
        message,
        mode,
        cont,
        state,
        client_value,
        sp,
        temp,
        tp,
        mnt,
        request: gr.Request,
        profile: gr.OAuthProfile | None = None,
    ):
        """Two answers (per the mode) streamed side by side; the vote buttons unlock when both are finished."""
        voter = voter_of(self.service, client_value, request, profile)
        with UserError():
            stream = self.service.compare(
                voter,
                message,
                state["conversation_id"] if cont else "",
                parent_id=state["leaf"] if cont else None,
                mode=mode,
                settings=settings_from(self.cfg, sp, temp, tp, mnt),
            )
            first = next(stream)
        for update in itertools.chain([first], stream):
            if update["pair_id"] is None:
                yield (
                    show(update["a"]["text"]),
                    show(update["b"]["text"]),
                    *self.LOCKED,
                    "",
                    gr.Button(visible=False),
                    {},
                )
        unlocked = [gr.Button(interactive=True)] * 4
        pair = {**update, "message": message}
        yield show(update["a"]["text"]), show(update["b"]["text"]), *unlocked, "", gr.Button(visible=False), pair

    def _chooser(self, choice: str):
        def do_choose(pair, why, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
            if not pair.get("pair_id"):
                raise gr.Error("Get two answers first.")
            with UserError():
                result = self.service.choose(
                    voter_of(self.service, client_value, request, profile), pair["pair_id"], choice, why
                )
            reveal = (
                f"**Recorded: {LABELS[choice]}.** A was written by **{html.escape(result['a_version'])}**, "
                f"B by **{html.escape(result['b_version'])}**."
            )
            can_continue = choice in ("A", "B")
            return *self.LOCKED, reveal, gr.Button(visible=can_continue), {**pair, "choice": choice}, ""

        return do_choose

    def use_choice(self, pair, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
        """Open the Chat tab on the chosen answer's branch."""
        return *self.chat.show_pair_choice(pair, client_value, request, profile), gr.Tabs(selected="chat")
