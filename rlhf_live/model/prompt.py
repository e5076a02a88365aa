"""The one renderer: how a conversation becomes the policy's token ids, for serving, the reward model, every learner
and the evaluation alike.

Knows chat templates, turns and token budgets (which turns are kept, where a long message is cut, the generation
prompt); knows nothing of models, sampling, SQL or who asked. A stored conversation carries the system prompt its
answers were written under, and every consumer renders it from here, so a vote on an answer written under "You are a
pirate" trains the policy on the ids that answer was sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_PROMPT_TOKENS = 16
"""A prompt budget below this leaves no room for a question."""


@dataclass(frozen=True)
class Rendered:
    """A prompt as the policy reads it."""

    ids: list[int]
    """System prompt, kept turns and the generation prompt, as token ids."""
    messages: list[dict]
    """The messages those ids render (the system prompt first when there is one; a cut message as cut)."""
    dropped: int
    """Oldest turns left out to fit the budget."""


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
    """The messages an answer is written under: `system_prompt` first (none when empty), then the turns."""
    turns = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + turns


def prompt_budget(max_context_tokens: int, max_new_tokens: int) -> int:
    """Tokens a prompt may take when an answer of `max_new_tokens` must still fit the context."""
    budget = max_context_tokens - max_new_tokens
    if budget < MIN_PROMPT_TOKENS:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in a context of "
            f"{max_context_tokens} tokens."
        )
    return budget


def training_budget(cfg) -> int:
    """Prompt tokens a learner renders: what serving would keep, capped at Config.ppo_max_prompt_tokens (compute)."""
    # A conversation that fits the cap renders to exactly the ids it was served with; a longer one loses its oldest
    # turns by the same rule serving uses, only sooner.
    return min(cfg.ppo_max_prompt_tokens, max(cfg.max_context_tokens - cfg.max_new_tokens, MIN_PROMPT_TOKENS))


def template(tokenizer, messages: list[dict], generation_prompt: bool = True) -> list[int]:
    """The tokenizer's chat template over `messages`, as a list of ids."""
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
        )
    )


def render(tokenizer, messages: list[dict], budget: int) -> Rendered:
    """`messages` (system prompt first, if any; ending with a user turn) as prompt ids within `budget` tokens."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("A conversation must end with a user message to be answered.")
    dropped = 0
    ids = template(tokenizer, system + turns)
    while len(ids) > budget and len(turns) > 1:
        turns, dropped = turns[1:], dropped + 1  # the oldest turn goes; the system prompt stays
        while len(turns) > 1 and turns[0]["role"] != "user":  # never start with an answer
            turns, dropped = turns[1:], dropped + 1
        ids = template(tokenizer, system + turns)
    if len(ids) > budget:  # one message alone is too long: keep its end, which holds the question
        content = tokenizer(turns[-1]["content"], add_special_tokens=False)["input_ids"]
        kept = tokenizer.decode(content[len(ids) - budget + 4 :])
        turns = [{"role": "user", "content": kept}]
        ids = template(tokenizer, system + turns)[-budget:]
    return Rendered(ids, system + turns, dropped)


def answer_ids(tokenizer, prompt: Rendered, answer: str) -> list[int]:
    """The ids `answer` adds after `prompt`, its end-of-turn tokens included, as the template writes them."""
    full = template(tokenizer, [*prompt.messages, {"role": "assistant", "content": answer}], generation_prompt=False)
    if full[: len(prompt.ids)] == prompt.ids:
        return full[len(prompt.ids) :]
    # A template that rewrites earlier turns once an answer follows (or a prompt cut to its end): answer + EOS.
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
