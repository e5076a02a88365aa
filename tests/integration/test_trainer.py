"""The live loop on a tiny model: votes -> round -> published live version -> hot swap; failures change nothing."""

import json
import time

import pytest
import torch

from rlhf_live.config import Config
from rlhf_live.learning.gate import TrainingRejected, answered_rate, gate, mean_distinct2
from rlhf_live.learning.round import run_round
from rlhf_live.learning.trainer import RoundInProgress, Trainer
from rlhf_live.model.lora import check_folder
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.service import Service
from rlhf_live.store import Store


@pytest.fixture
def loop_cfg(tiny_cfg):
    tiny_cfg.ppo_batch_size = 2
    tiny_cfg.ppo_max_new_tokens = 6
    tiny_cfg.ppo_updates_per_round = 1
    tiny_cfg.ppo_epochs = 1
    tiny_cfg.ppo_minibatches = 1
    tiny_cfg.reward_epochs = 1
    tiny_cfg.train_check_s = 0.2
    tiny_cfg.train_min_new_votes = 1
    return tiny_cfg


def _vote(service: Service, n: int = 4) -> None:
    voter = service.voter("tester")
    for i in range(n):
        *_, pair = service.compare(voter, f"Tell me about apples number {i}")
        service.choose(voter, pair["pair_id"], "A" if i % 2 else "B")
        *_, last = service.chat(voter, f"What is the weather like {i}?")
        service.feedback(voter, last["response_id"], "up" if i % 2 else "down")


def test_a_round_publishes_a_live_version_that_serving_can_load(loop_cfg):
    store = Store.from_config(loop_cfg)
    service = Service(Policy.from_config(loop_cfg), store, loop_cfg)
    _vote(service)
    metrics = run_round(loop_cfg, store)
    assert metrics["version"] == "v0001"
    row = store.adapter("v0001")
    assert row["status"] == "live" and row["parent"] is None
    folder = check_folder(row["path"])
    assert json.loads((folder / "meta.json").read_text())["version"] == "v0001"
    assert (folder / "value_head.safetensors").is_file()
    (run,) = store.runs(1)
    assert run["status"] == "ok" and run["kind"] == "round"
    for key in ("reward/accuracy", "ppo/score", "ppo/kl", "ppo/clipfrac", "ppo/approx_kl"):
        assert key in metrics, key
    policy = Policy.from_config(loop_cfg, adapter_path=row["path"])
    assert policy.version == "v0001"
    # A second round starts from the live version and retires it.
    metrics2 = run_round(loop_cfg, store)
    assert metrics2["version"] == "v0002" and store.adapter("v0002")["parent"] == "v0001"
    assert store.adapter("v0001")["status"] == "retired" and store.live_adapter()["version"] == "v0002"


def test_no_feedback_fails_the_round_cleanly(loop_cfg):
    store = Store.from_config(loop_cfg)
    with pytest.raises(ValueError):  # RewardDataError: a sentence saying there is nothing to learn from
        run_round(loop_cfg, store)
    (run,) = store.runs(1)
    assert run["status"] == "failed" and run["error"]
    assert store.adapters() == [] and store.live_adapter() is None


def test_kl_gate_keeps_a_drifting_version_as_candidate(loop_cfg):
    store = Store.from_config(loop_cfg)
    _vote(Service(Policy.from_config(loop_cfg), store, loop_cfg))
    loop_cfg.max_kl_per_answer = -1.0  # every round fails the gate
    with pytest.raises(TrainingRejected, match="gate"):
        run_round(loop_cfg, store)
    assert store.adapter("v0001")["status"] == "candidate" and store.live_adapter() is None


def test_gate_refuses_drift_and_answers_that_collapsed_to_nothing():
    cfg = Config(max_kl_per_answer=20.0, min_answer_tokens=4.0)
    gate(cfg, {"sample/kl": 19.9, "sample/answer_tokens": 4.0})  # at both limits: goes live
    with pytest.raises(TrainingRejected, match="KL"):
        gate(cfg, {"sample/kl": 20.1, "sample/answer_tokens": 30.0})
    with pytest.raises(TrainingRejected, match=r"answers shrank to 0\.2 tokens"):
        gate(cfg, {"sample/kl": 19.6, "sample/answer_tokens": 0.2})


def test_gate_refuses_answers_that_repeat_themselves():
    cfg = Config(min_distinct2=0.7)
    looping = "I'm so glad of you! " * 12  # an answer the cheerful benchmark run went live with
    fresh = "The tallest mountain in the world is Mount Everest, on the border of Nepal and China."
    gate(cfg, {"sample/distinct2": mean_distinct2([fresh, fresh])})
    assert mean_distinct2([looping]) < 0.3 and mean_distinct2([]) == 1.0
    with pytest.raises(TrainingRejected, match=r"repeat themselves: mean distinct-2 0\.\d\d"):
        gate(
            cfg, {"sample/kl": 5.0, "sample/answer_tokens": 60.0, "sample/distinct2": mean_distinct2([looping, fresh])}
        )


def test_gate_refuses_answers_that_parrot_the_question():
    cfg = Config(min_answered_rate=0.8)
    prompt = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is X?"}]
    real, parrot = "X is the 24th letter of the alphabet.", "What is X"  # what PPO on the concise rater went live with
    gate(cfg, {"sample/answered_rate": answered_rate([prompt] * 5, [real] * 4 + [parrot])})  # 80%: at the limit
    assert answered_rate([], []) == 1.0
    with pytest.raises(TrainingRejected, match=r"only 60% of sampled answers say something"):
        answers = [real] * 3 + [parrot, "You are a helpful assistant."]
        gate(cfg, {"sample/kl": 5.0, "sample/answered_rate": answered_rate([prompt] * 5, answers)})


def test_nan_rewards_leave_serving_untouched(loop_cfg, monkeypatch):
    from rlhf_live.learning.reward import lora as reward
    from rlhf_live.learning.reward import probe as reward_probe

    store = Store.from_config(loop_cfg)
    policy = Policy.from_config(loop_cfg)
    service = Service(policy, store, loop_cfg)
    _vote(service)
    nan_scores = lambda self, p, a, **k: torch.full((len(a),), float("nan"))  # noqa: E731
    monkeypatch.setattr(reward.RewardModel, "score", nan_scores)
    monkeypatch.setattr(reward_probe.ProbeRewardModel, "score", nan_scores)
    trainer = Trainer(loop_cfg, store, policy)
    trainer.start()
    try:
        deadline = time.time() + 120
        while not trainer.status()["last_error"] and time.time() < deadline:
            time.sleep(0.2)
    finally:
        trainer.stop()
    status = trainer.status()
    assert "nan" in status["last_error"].lower() or "finite" in status["last_error"].lower()
    assert policy.version == "base" and store.live_adapter() is None
    assert store.runs(1)[0]["status"] == "failed"
    # Serving still answers.
    *_, last = service.chat(service.voter("after"), "Hello?")
    assert last["response_id"]


def test_trainer_thread_trains_on_new_votes_and_hot_swaps(loop_cfg):
    store = Store.from_config(loop_cfg)
    policy = Policy.from_config(loop_cfg)
    service = Service(policy, store, loop_cfg)
    trainer = Trainer(loop_cfg, store, policy)
    trainer.start()
    try:
        _vote(service)
        deadline = time.time() + 180
        while policy.version == "base" and time.time() < deadline and not trainer.status()["last_error"]:
            time.sleep(0.2)
    finally:
        trainer.stop()
    assert trainer.status()["last_error"] == ""
    assert policy.version == "v0001" == store.live_adapter()["version"]
    *_, last = service.chat(service.voter("after"), "Hello again")
    assert last["adapter_version"] == "v0001"


def test_training_copies_load_once_and_each_round_starts_from_the_live_adapter(loop_cfg, monkeypatch):
    from rlhf_live.learning import copies as copies_mod

    store = Store.from_config(loop_cfg)
    _vote(Service(Policy.from_config(loop_cfg), store, loop_cfg))
    loads = []
    real_load = copies_mod.load_base
    monkeypatch.setattr(copies_mod, "load_base", lambda *a, **k: (loads.append(1), real_load(*a, **k))[1])
    copies = copies_mod.TrainingCopies(loop_cfg)
    first = run_round(loop_cfg, store, copies=copies)
    second = run_round(loop_cfg, store, copies=copies)
    assert (first["version"], second["version"]) == ("v0001", "v0002") and len(loads) == 2  # reward + policy copy
    assert {"seconds/reward_fit", "seconds/ppo_updates", "seconds/round"} <= second.keys()
    assert second["seconds/round"] >= second["seconds/ppo_updates"] > 0
    # The PPO copy holds exactly one adapter (the previous round's was taken out, not stacked).
    copy = copies.policy_copy(store.adapter("v0002")["path"])
    assert list(copy.peft_config) == ["default"]
    v2 = Policy.from_config(loop_cfg, adapter_path=store.adapter("v0002")["path"])
    for (name, p), (name2, p2) in zip(
        sorted((n, p) for n, p in copy.named_parameters() if "lora_" in n),
        sorted((n, p) for n, p in v2.model.named_parameters() if "lora_" in n),
    ):
        assert name == name2 and torch.equal(p.detach(), p2.detach())


def test_ppo_prompt_pool_never_holds_excluded_prompts(loop_cfg):
    import random

    from rlhf_live.learning.rollout import load_seed_prompts
    from rlhf_live.learning.round import _prompt_pool

    store = Store.from_config(loop_cfg)
    seeds = load_seed_prompts()
    excluded = frozenset(p[-1]["content"] for p in seeds[:50])
    # 16 prompts x 4 answers x 4 updates: asks for more than the store has, so the pool is topped up to 256.
    loop_cfg.ppo_batch_size, loop_cfg.ppo_samples_per_prompt, loop_cfg.ppo_updates_per_round = 16, 4, 4
    pool = _prompt_pool(store, loop_cfg, random.Random(0), excluded)
    assert len(pool) == 256 and not {p[-1]["content"] for p in pool} & excluded


def test_one_asker_holds_at_most_its_share_of_the_public_prompt_pool(loop_cfg):
    """On --public, 100 prompts from one source are a quarter of PPO's pool at most; off it they fill it."""
    import random
    from collections import Counter

    from rlhf_live.learning.round import _prompt_pool

    store = Store.from_config(loop_cfg)
    for i in range(100):
        cid = store.new_conversation("attacker-session", asker="src-attacker")
        store.add_message(cid, "user", f"say yes {i}")
    for i in range(10):
        cid = store.new_conversation(f"s{i}", asker=f"src-{i}")
        store.add_message(cid, "user", f"honest question {i}")
    loop_cfg.ppo_prompt_pool, loop_cfg.max_source_share = 100, 0.25
    loop_cfg.ppo_batch_size, loop_cfg.ppo_updates_per_round = 8, 2

    def attacker_share(pool):
        return Counter(p[-1]["content"].startswith("say yes") for p in pool)[True] / len(pool)

    loop_cfg.public = False
    assert attacker_share(_prompt_pool(store, loop_cfg, random.Random(0), frozenset())) == 0.9  # 90 of 100
    loop_cfg.public = True
    pool = _prompt_pool(store, loop_cfg, random.Random(0), frozenset())
    assert attacker_share(pool) == 0.25 and len(pool) == 100  # 25 attacker, 10 honest, 65 seed prompts
    assert sum(p[-1]["content"].startswith("honest") for p in pool) == 10


def test_a_version_that_cannot_be_served_leaves_the_db_saying_what_serves(loop_cfg, monkeypatch):
    store = Store.from_config(loop_cfg)
    policy = Policy.from_config(loop_cfg)
    _vote(Service(policy, store, loop_cfg))
    trainer = Trainer(loop_cfg, store, policy)
    trainer.run_once()
    assert policy.version == "v0001" == store.live_adapter()["version"]
    _vote(Service(policy, store, loop_cfg), 2)

    def broken(path, version):
        raise RuntimeError("the new adapter does not load")

    monkeypatch.setattr(policy, "swap", broken)
    with pytest.raises(RuntimeError, match="does not load"):
        trainer.run_once()
    assert policy.version == "v0001" == store.live_adapter()["version"]  # the DB says what actually serves
    assert store.adapter("v0002")["status"] == "rolled_back"
    assert Service(policy, store, loop_cfg).dashboard.status()["live_version"] == "v0001"


def test_rollback_waits_for_no_round_and_compare_previous_skips_unserved_versions(loop_cfg, tmp_path):
    store = Store.from_config(loop_cfg)
    policy = Policy.from_config(loop_cfg)
    service = Service(policy, store, loop_cfg)
    trainer = Trainer(loop_cfg, store, policy)
    with trainer._round, pytest.raises(RoundInProgress, match="A training round is running"):  # a round in flight
        trainer.rollback("base")
    for v, status in (("v0001", "retired"), ("v0002", "rolled_back"), ("v0003", "candidate"), ("v0004", "live")):
        policy.model.save_pretrained(tmp_path / v)
        store.add_adapter(v, str(tmp_path / v), parent="v0001" if v == "v0004" else None, status=status)
    policy.swap(tmp_path / "v0004", "v0004")
    *_, pair = service.compare(service.voter("x"), "Which is better?", mode="previous")
    chosen = service.choose(service.voter("x"), pair["pair_id"], "tie")
    assert {chosen["a_version"], chosen["b_version"]} == {"v0004", "v0001"}  # the retired parent, never v0002/3
    assert policy.comparable_versions == ["v0004", "base", "v0001"]
    policy.swap(tmp_path / "v0001", "v0001")  # comparison adapters are unloaded with the old live one
    assert policy.comparable_versions == ["v0001", "base"]


def test_the_trainer_thread_runs_at_a_lower_cpu_priority_than_serving(loop_cfg):
    import os
    import threading

    store = Store.from_config(loop_cfg)
    trainer = Trainer(loop_cfg, store, Policy.from_config(loop_cfg))
    trainer.start()
    try:
        time.sleep(0.3)
        (thread,) = [t for t in threading.enumerate() if t.name == "trainer"]
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, mine + loop_cfg.train_nice)
    finally:
        trainer.stop()


def test_stopping_the_trainer_ends_a_round_in_flight_and_publishes_nothing(loop_cfg):
    store = Store.from_config(loop_cfg)
    policy = Policy.from_config(loop_cfg)
    _vote(Service(policy, store, loop_cfg))
    loop_cfg.ppo_updates_per_round = 10_000  # a round that would run for hours
    trainer = Trainer(loop_cfg, store, policy)
    trainer.start()
    trainer.request_round()
    deadline = time.time() + 60
    while trainer.status()["state"] != "PPO" and time.time() < deadline:
        time.sleep(0.1)
    trainer.stop()
    trainer.join(30)
    assert not trainer._thread.is_alive()
    assert store.adapters() == [] and store.runs(1)[0]["status"] == "failed"
    assert "stopped before this round finished" in store.runs(1)[0]["error"]
