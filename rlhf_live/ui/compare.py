"""The Compare tab: two answers side by side with hidden sources, an A/B/tie/both-bad vote, then the reveal.

Knows the Compare tab's components and handlers; takes the generation settings and the conversation to continue
from the Chat tab (`ChatTab`), and can hand the chosen answer back to it.
"""

from __future__ import annotations

import html
import itertools

import gradio as gr

from rlhf_live.config import Config
from rlhf_live.logs import refusal
from rlhf_live.serving.samplers import coalesced
from rlhf_live.serving.service import COMPARE_MODES, USER_ERRORS, Service
from rlhf_live.ui.chat import ChatTab
from rlhf_live.ui.common import PRIVATE, UserError, caller_of, refused, settings_from, show

LABELS = {"A": "A is better", "B": "B is better", "tie": "a tie", "both_bad": "both bad"}


class CompareTab:
    """Builds the Compare tab inside the current gr.Blocks and wires its events."""

    def __init__(self, service: Service, cfg: Config, chat: ChatTab, tabs: gr.Tabs, generate: dict):
        self.service, self.cfg, self.chat, self.tabs, self.generate = service, cfg, chat, tabs, generate
        with gr.Tab("Compare", id="compare") as self.tab:
            self._layout()
        self._wire()

    def _layout(self) -> None:
        gr.Markdown(
            "Write a prompt and get two answers side by side. Which one is better? Sources stay hidden until you vote."
        )
        with gr.Row(equal_height=True):
            self.box = gr.Textbox(placeholder="Your prompt", show_label=False, scale=6, elem_id="cmp-input")
            modes = [(label, key) for key, label in COMPARE_MODES.items()]
            self.mode = gr.Dropdown(
                modes, value="samples", show_label=False, scale=4, min_width=320, elem_id="cmp-mode"
            )
            self.go = gr.Button("Get two answers", variant="primary", scale=2, elem_id="cmp-go")
        with gr.Row():
            self.cont = gr.Checkbox(False, label="Continue the chat (the prompt follows the Chat tab's conversation)")
            self.modes_note = gr.Markdown("", elem_id="cmp-modes-note")
        self.note = gr.Markdown("", elem_id="cmp-note")
        with gr.Row(equal_height=True):
            with gr.Column(min_width=300):
                self.a = gr.Markdown("", elem_id="cmp-a", elem_classes=["answer-box"])
            with gr.Column(min_width=300):
                self.b = gr.Markdown("", elem_id="cmp-b", elem_classes=["answer-box"])
        self.reason = gr.Textbox(placeholder="Why? (optional, sent with your vote)", show_label=False, max_length=1000)
        with gr.Row():
            self.buttons = {
                "A": gr.Button("👈 A is better", interactive=False, elem_id="choose-a"),
                "B": gr.Button("👉 B is better", interactive=False, elem_id="choose-b"),
                "tie": gr.Button("🤝 Tie", interactive=False, elem_id="choose-tie"),
                "both_bad": gr.Button("👎 Both bad", interactive=False, elem_id="choose-bad"),
            }
        with gr.Row(equal_height=True):
            self.reveal = gr.Markdown("", elem_id="cmp-reveal")
            self.use = gr.Button(
                "Continue in Chat with the chosen answer",
                visible=False,
                size="sm",
                scale=0,
                min_width=300,
                elem_id="cmp-use",
            )
        self.pair = gr.State({})

    def _wire(self) -> None:
        chat = self.chat
        outputs = [self.note, self.a, self.b, *self.buttons.values(), self.reveal, self.use, self.pair]
        inputs = [self.box, self.mode, self.cont, chat.state, chat.client, *chat.settings]
        quiet = {"show_progress": "hidden"}  # the note line says what happens; no spinner over the old answers
        self.go.click(self.do_compare, inputs, outputs, **self.generate, **PRIVATE, **quiet)
        self.box.submit(self.do_compare, inputs, outputs, **self.generate, **PRIVATE, **quiet)
        after = [*self.buttons.values(), self.reveal, self.use, self.pair, self.reason]
        for choice, button in self.buttons.items():
            button.click(self._chooser(choice), [self.pair, self.reason, chat.client], after, **PRIVATE)
        self.use.click(
            self.use_choice, [self.pair, chat.client], [chat.chatbot, chat.state, chat.client, self.tabs], **PRIVATE
        )
        self.tab.select(self.mode_view, [self.mode], [self.mode, self.modes_note], **PRIVATE, **quiet)

    def mode_view(self, mode: str | None = None):
        """The modes that apply now (others named with the reason), before anyone asks for one that cannot."""
        available = self.service.compare_modes()
        choices = [(label, key) for key, label in COMPARE_MODES.items() if not available[key]]
        missing = [f"*{COMPARE_MODES[key]}*: {why}" for key, why in available.items() if why]
        value = mode if mode in dict(map(reversed, choices)) else "samples"
        return gr.update(choices=choices, value=value), " ".join(missing)

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
        # The first update clears the last comparison (answers, reveal, chosen pair) whatever happens next; a refused
        # request says why in the note line instead of leaving the old answers under the new prompt.
        cleared = ("", "", *self.LOCKED, "", gr.update(visible=False), {})
        who = caller_of(self.service, client_value, request, profile)
        yield "Starting…", *cleared
        try:
            stream = self.service.compare(
                who,
                message,
                state["conversation_id"] if cont else "",
                parent_id=state["leaf"] if cont else None,
                mode=mode,
                settings=settings_from(self.cfg, sp, temp, tp, mnt),
            )
            first = next(stream)
        except USER_ERRORS as exc:
            refusal(str(exc))
            yield f"⚠️ {html.escape(str(exc))}", *cleared
            return
        try:
            shown = None
            for update in coalesced(itertools.chain([first], stream), self.cfg.stream_interval_s):
                if update["pair_id"] is None:
                    note = update.get("note") or "Writing two answers…"
                    a, b = show(update["a"]["text"]), show(update["b"]["text"])
                    # Only what changed is sent: the buttons, reveal and pair stay as the first update left them.
                    fresh = [x if x != old else gr.skip() for x, old in zip((note, a, b), shown or ("", "", ""))]
                    shown = (note, a, b)
                    yield *fresh, *[gr.skip()] * 7
        finally:
            stream.close()
        unlocked = [gr.update(interactive=True)] * 4
        pair = {**update, "message": message}
        done = "Both answers are finished: which one is better?"
        yield done, show(update["a"]["text"]), show(update["b"]["text"]), *unlocked, "", gr.update(), pair

    def _chooser(self, choice: str):
        def do_choose(pair, why, client_value, request: gr.Request, profile: gr.OAuthProfile | None = None):
            if not pair.get("pair_id"):
                raise refused("Get two answers first.")
            with UserError():
                result = self.service.choose(
                    caller_of(self.service, client_value, request, profile), pair["pair_id"], choice, why
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
