"""What the reward model reads: a conversation and an answer as token ids, cut to its budget as serving cuts them.

Knows the one renderer (model/prompt.py) and the reward budget; knows nothing of tensors, heads or training.
"""

from __future__ import annotations

import json

from rlhf_live.learning.reward.data import Example, RewardDataError, as_messages
from rlhf_live.model.prompt import Rendered, answer_ids, render


class Encoder:
    """template(conversation) + answer + end of turn, at most `max_tokens` ids (conversations rendered once)."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self._prompts: dict[str, Rendered] = {}

    def parts(self, prompt, answer: str) -> tuple[list[int], str, int]:
        """(ids, what was cut: '' | 'prompt' | 'answer', how many of the last ids are the answer's)."""
        messages = as_messages(prompt)
        key = json.dumps(messages, ensure_ascii=False)
        whole = self._prompts.get(key)
        if whole is None:
            try:  # the one renderer, with room for every turn: what serving answered from, uncut
                whole = render(self.tokenizer, messages, budget=1 << 30)
            except ValueError as exc:
                raise RewardDataError(str(exc)) from None
            if len(self._prompts) > 4096:
                self._prompts.clear()
            self._prompts[key] = whole
        answer_part = answer_ids(self.tokenizer, whole, answer)
        budget = self.max_tokens
        if len(answer_part) >= budget:
            return answer_part[-budget:], "answer", budget  # its end decides how it is judged; the question is lost
        keep = budget - len(answer_part)
        if len(whole.ids) > keep:  # oldest turns dropped as serving drops them (the system prompt stays)
            return render(self.tokenizer, messages, keep).ids + answer_part, "prompt", len(answer_part)
        return whole.ids + answer_part, "", len(answer_part)

    def fill(self, examples: list[Example]) -> dict:
        """Fill `ids` of every example; counts of truncations."""
        counts = {"n_prompt_truncated": 0, "n_answer_truncated": 0}
        for ex in examples:
            ex.ids = []
            for answer in ex.answers:
                ids, cut, _ = self.parts(ex.prompt, answer)
                ex.ids.append(ids)
                if cut:
                    counts[f"n_{cut}_truncated"] += 1
        return counts
