"""Train what you serve: one renderer turns a stored conversation into the same token ids for every consumer."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rlhf_live.learning import ppo
from rlhf_live.learning.direct import dpo_examples, kto_examples
from rlhf_live.learning.reward.lora import RewardModel
from rlhf_live.learning.round import _prompt_pool
from rlhf_live.model import base as models
from rlhf_live.model.lora import attach_adapter
from rlhf_live.model.prompt import answer_ids, prompt_budget, render, template, training_budget, with_system
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest
from rlhf_live.store import Store

PIRATE = "You are a pirate. Answer every question as a pirate would."


@pytest.fixture
def cfg(tiny_cfg):
    # Budgets aligned: serving keeps 240 - 16 = 224 prompt tokens, learners the same (no compute cap below it).
    return dataclasses.replace(tiny_cfg, max_context_tokens=240, max_new_tokens=16, ppo_max_prompt_tokens=224)


def _conversation(store: Store, turns: int, sentence: str) -> tuple[str, str, str]:
    """A pirate conversation of `turns` earlier exchanges, then a question with two sibling answers (A/B)."""
    cid = store.new_conversation("v-pirate", system_prompt=PIRATE)
    parent = None
    for i in range(turns):
        q = store.add_message(cid, "user", f"Question {i}: {sentence}", parent_id=parent)
        parent = store.add_message(cid, "assistant", f"Arr, answer {i}.", parent_id=q, adapter_version="base")
    last = store.add_message(cid, "user", "And where is the treasure buried?", parent_id=parent)
    a = store.add_message(cid, "assistant", "Under the old oak, matey.", parent_id=last, adapter_version="base")
    b = store.add_message(cid, "assistant", "I cannot say.", parent_id=last, adapter_version="base")
    return cid, a, b


@pytest.mark.parametrize("turns", [0, 30], ids=["short", "long-history-cut"])
def test_every_consumer_renders_a_stored_conversation_to_the_ids_it_was_served_from(cfg, turns):
    store = Store.from_config(cfg)
    cid, a, b = _conversation(store, turns, "tell me about the sea and the ships that sail on it. " * 2)
    pair_id = store.new_comparison(cid, a, b, a_source="base", b_source="base", voter="v-pirate")
    store.choose(pair_id, "v-pirate", "A")
    (pair,) = store.preference_pairs()  # the A/B siblings' training row, as every learner reads it
    context = store.context(a)
    assert context == store.context(b) == pair.prompt and context[0] == {"role": "system", "content": PIRATE}

    # Serving: the Service answers under the conversation's own system prompt.
    served_policy = Policy.from_config(cfg)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, system_prompt=PIRATE)
    served, dropped = served_policy.build_prompt(context, settings)
    assert len(served) <= prompt_budget(cfg.max_context_tokens, cfg.max_new_tokens)
    assert (dropped > 0) == (turns > 0)  # the long history really is cut
    tok = served_policy.tokenizer

    # PPO: the prompt pool holds the stored context; its rollouts start from the same ids.
    pool = [p for p in _prompt_pool(store, cfg, random.Random(0), frozenset()) if p[:1] == context[:1]]
    assert pool and pool[0] == context
    base, _ = models.load_base(cfg)
    trainer = ppo.PPOTrainer(attach_adapter(base, cfg, trainable=True), tok, cfg, lambda p, a: None)
    assert trainer._prompt_ids(pool[0]) == served

    # DPO and KTO: TRL templates the messages we give it, so those messages must template to the served ids.
    pairs = [pair]
    assert (pair.chosen, pair.rejected) == ("Under the old oak, matey.", "I cannot say.")
    (dpo,) = dpo_examples(cfg, tok, pairs)
    assert template(tok, dpo["prompt"]) == served
    kto = kto_examples(cfg, tok, pairs, [])
    assert {tuple(template(tok, row["prompt"])) for row in kto} == {tuple(served)}

    # The reward model: the prompt part of what it scores, when its budget leaves the served prompt room.
    answer = answer_ids(tok, render(tok, context, 1 << 30), "Under the old oak, matey.")
    rm = RewardModel.create(dataclasses.replace(cfg, reward_max_tokens=len(served) + len(answer)))
    ids, cut, n_answer = rm.encode_parts(context, "Under the old oak, matey.")
    assert ids[:-n_answer] == served and ids[-n_answer:] == answer
    assert cut == ("prompt" if turns else "")


def test_a_seed_prompt_is_trained_under_the_serving_system_prompt(cfg):
    """A new conversation is stored with Config.system_prompt, so PPO's seed prompts carry it too."""
    cfg = dataclasses.replace(cfg, system_prompt="Be brief.")
    pool = _prompt_pool(Store.from_config(cfg), cfg, random.Random(0), frozenset())
    assert pool and all(p[0] == {"role": "system", "content": "Be brief."} for p in pool)


def test_render_keeps_the_system_prompt_and_cuts_the_oldest_turns_first(cfg):
    tok = Policy.from_config(cfg).tokenizer
    turns = [{"role": r, "content": f"{r} turn {i} " * 5} for i in range(8) for r in ("user", "assistant")]
    messages = with_system([*turns, {"role": "user", "content": "last question"}], PIRATE)
    whole = render(tok, messages, 1 << 30)
    assert whole.dropped == 0 and whole.ids == template(tok, messages)
    cut = render(tok, messages, len(whole.ids) - 1)
    assert cut.messages[0]["content"] == PIRATE and cut.messages[1]["role"] == "user"  # never starts with an answer
    assert cut.dropped == 2 and cut.messages[-1]["content"] == "last question"
    assert cut.ids == template(tok, cut.messages) and len(cut.ids) < len(whole.ids)
    huge = render(tok, with_system([{"role": "user", "content": "word " * 500 + "the end?"}], PIRATE), 64)
    assert len(huge.ids) <= 64 and tok.decode(huge.ids).rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="end with a user message"):
        render(tok, [{"role": "assistant", "content": "hi"}], 64)
    with pytest.raises(ValueError, match="leaves no room"):
        prompt_budget(64, 60)
    assert training_budget(dataclasses.replace(cfg, ppo_max_prompt_tokens=50)) == 50


def test_serving_refuses_a_conversation_it_cannot_answer(cfg):
    p = Policy.from_config(cfg)
    with pytest.raises(InvalidRequest, match="leaves no room"):
        p.build_prompt([{"role": "user", "content": "hi"}], GenerationSettings(max_new_tokens=230))
