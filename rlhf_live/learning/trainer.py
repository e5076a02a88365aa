"""When and what to train: one round = fit the reward model on all feedback -> PPO updates -> publish a version.

Knows the order of a round, the guardrails (enough new votes, a finite and bounded update, KL gate) and the
background thread that runs rounds while the app serves; it owns its own copy of the model (serving and training
never share a live module) and hands results over only as a published adapter folder plus a DB row.
Knows nothing of Gradio.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.eval.evaluation import distinct_n, is_answer
from rlhf_live.learning import crowd
from rlhf_live.learning.direct import LEARNERS, DirectDivergence, reward_ranked_pairs, train_direct
from rlhf_live.learning.ppo import PPODivergence, PPOTrainer, load_seed_prompts
from rlhf_live.learning.reward.lora import RewardDataError, RewardModel
from rlhf_live.learning.reward.probe import ProbeRewardModel
from rlhf_live.model.base import load_base, prepare_cpu_4bit, resolve
from rlhf_live.model.prompt import with_system
from rlhf_live.serving.policy import BASE, InvalidRequest, Policy, attach_adapter, prebuild_engine_file
from rlhf_live.store import Store, recovery
from rlhf_live.store.folders import AdapterRegistry

Progress = Callable[[str, str], None]
"""progress(state, detail): the round's stage (one of `round_stages`) and what it is doing, e.g. 'update 3/8'."""


def round_stages(learner: str) -> tuple[str, ...]:
    """The states a round of `learner` goes through, in order (what `progress` reports as its first argument)."""
    if learner == "ppo":
        train = ("fitting reward model", "PPO")
    elif learner == "rm-dpo":
        train = ("fitting reward model", "RM-DPO", "evaluating")
    else:  # dpo, kto: no reward model; answers are sampled afterwards for the gate
        train = (learner.upper(), "evaluating")
    return (*train, "publishing", "gate", "going live")


class TrainingRejected(RuntimeError):
    """A round finished but its result failed a guardrail, so it was not made live; the message says which."""


class TrainingStopped(RuntimeError):
    """The trainer was stopped (the app is shutting down) in the middle of a round; nothing was published."""


ROUND_FAILURES = (
    RewardDataError,
    TrainingRejected,
    TrainingStopped,
    PPODivergence,
    DirectDivergence,
    recovery.TrainingBusy,
)
"""Failures a round expects and explains in one sentence (recorded without a traceback type name)."""


def _prompt_pool(store: Store, cfg: Config, rng: random.Random, exclude: frozenset[str]) -> list[list[dict]]:
    """What users really asked (their contexts), topped up from the seed prompts when there are few."""
    # On --public no asker supplies more than max_source_share of the pool (as of the votes' weight): one source's
    # prompts would otherwise be all PPO practises on, however capped the reward model that scores them.
    per_asker = math.ceil(cfg.max_source_share * cfg.ppo_prompt_pool) if cfg.public else None
    asked = store.asked(limit=cfg.ppo_prompt_pool, per_asker=per_asker)
    real = [messages for _, messages in asked]
    # A seed prompt is asked as a new conversation would be: under the serving system prompt.
    seeds = [with_system(p, cfg.system_prompt) for p in load_seed_prompts() if p[-1]["content"] not in exclude]
    rng.shuffle(seeds)
    need = cfg.ppo_batch_size * cfg.ppo_updates_per_round
    if cfg.public:  # enough seed prompts beside the largest asker's that it holds at most its share
        largest = max(Counter(a for a, _ in asked if a).values(), default=0)
        need = max(need, math.ceil(largest / cfg.max_source_share))
    need = max(0, need - len(real))
    return real + seeds[:need] if need else real


def create_reward_model(cfg: Config, base=None, tokenizer=None) -> RewardModel:
    """The reward model Config.reward_kind names, on `base` (loaded when not given)."""
    if cfg.reward_kind == "probe":
        return ProbeRewardModel.create(cfg, base, tokenizer)
    if cfg.reward_kind == "lora":
        return RewardModel.create(cfg, base, tokenizer)
    raise ValueError(f"reward_kind must be 'probe' or 'lora', not {cfg.reward_kind!r}")


class Workbench:
    """The trainer's own models, loaded once and kept between rounds: loading and dequantizing cost seconds a round.

    The probe reward model is kept whole (it refits from zero each round, and its feature cache saves recomputing
    old answers); a LoRA reward model is made afresh. The PPO copy keeps its base and gets the live adapter
    attached anew each round.
    """

    def __init__(self, cfg: Config, exclude_prompts: frozenset[str] = frozenset()):
        self.cfg = cfg
        self.exclude_prompts = exclude_prompts
        """User messages PPO must never train on (a simulation's held-out prompts)."""
        self.reward_model: RewardModel | None = None
        """The last round's fitted reward model (for evaluation)."""
        self._source: str | None = None
        self._policy = None

    def source(self) -> str:
        """The base model's folder or hub id, resolved once."""
        if self._source is None:
            self._source = resolve(self.cfg.model, self.cfg.cache_dir)
        return self._source

    def new_reward_model(self) -> RewardModel:
        """The reward model to fit this round."""
        if isinstance(self.reward_model, ProbeRewardModel) and self.cfg.reward_kind == "probe":
            return self.reward_model
        self.reward_model = create_reward_model(self.cfg, *load_base(self.cfg, self.source()))
        return self.reward_model

    @property
    def policy_model(self):
        """The training copy as last attached (its base weights are serving's: the same NF4 values)."""
        return self._policy

    def policy_copy(self, adapter_path: str | None):
        """The PPO copy: the cached base with `adapter_path` (or a fresh LoRA) attached, trainable."""
        if self._policy is None:
            base, self.tokenizer = load_base(self.cfg, self.source())
            prepare_cpu_4bit(base, self.cfg)
        else:
            base = self._policy.unload()  # the LoRA layers out, the base's own linears back
        self._policy = attach_adapter(base, self.cfg, adapter_path, trainable=True)
        return self._policy


@dataclass
class _Round:
    """What every stage of one round shares: settings, models, the prompt pool, progress and the metrics so far."""

    cfg: Config
    bench: Workbench
    rng: random.Random
    pool: list[list[dict]]
    live: dict | None
    say: Progress
    wait: Callable[[], None]
    metrics: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=lambda: {"start": time.perf_counter()})

    @property
    def live_path(self) -> str | None:
        return self.live["path"] if self.live and Path(self.live["path"]).is_dir() else None

    def mark(self, stage: str) -> None:
        """The wall clock at the end of `stage` (its time is the gap to the previous mark)."""
        self.seconds[stage] = time.perf_counter()


def train_round(
    cfg: Config,
    store: Store,
    *,
    progress: Progress | None = None,
    pause: Callable[[], None] | None = None,
    bench: Workbench | None = None,
) -> dict:
    """One round on the store's feedback; publishes a candidate version and returns its metrics."""
    if cfg.learner not in LEARNERS:
        raise ValueError(f"learner must be one of {', '.join(LEARNERS)}, not {cfg.learner!r}")
    if cfg.direct_votes not in ("new", "all"):
        raise ValueError(f"direct_votes must be 'new' or 'all', not {cfg.direct_votes!r}")
    bench = bench or Workbench(cfg)
    registry = AdapterRegistry(cfg.adapters_dir)
    registry.clean_partial()
    watermark = store.watermark()
    rng = random.Random(cfg.seed + watermark)
    torch.manual_seed(cfg.seed + watermark)
    pool = _prompt_pool(store, cfg, rng, bench.exclude_prompts)
    say, wait = progress or (lambda stage, detail: None), pause or (lambda: None)
    r = _Round(cfg, bench, rng, pool, store.live_adapter(), say, wait, metrics={"learner": cfg.learner})
    pairs, ties, pointwise = store.preference_pairs(), store.ties(), store.pointwise_labels()
    statuses = store.source_statuses() if cfg.public else {}
    zeroed = frozenset(s for s, status in statuses.items() if status in ("flagged", "banned"))

    # 1. Reward model (PPO, rm-dpo): re-fit on every vote (they are few; a fresh fit avoids drifting on old data).
    reward_model = None
    if cfg.learner in ("ppo", "rm-dpo"):
        weighted = _weigh(cfg, zeroed, pairs, ties, pointwise)
        reward_model = _fit_reward(r, *weighted)
        # 1b. On a public deployment: flag sources whose votes the others' consensus finds contrarian; refit without.
        flagged = _flag_contrarians(r, store, reward_model, weighted, statuses, watermark)
        if flagged:
            zeroed |= flagged
            weighted = _weigh(cfg, zeroed, pairs, ties, pointwise)
            reward_model = _fit_reward(r, *weighted)
        _crowd_metrics(r, "reward", [row for rows in weighted for row in rows], zeroed)
        _enough_sources(cfg, r.metrics["crowd/reward_sources"], len(zeroed))
    # 2. The learner on a training copy of the live policy; the reference is the same model, adapter disabled.
    if cfg.learner == "ppo":
        save = _ppo(r, reward_model)
    else:
        since = 0 if cfg.direct_votes == "all" or not r.live else int((r.live.get("metrics") or {}).get("watermark", 0))
        new_pairs, new_labels = [p for p in pairs if p["seq"] > since], [p for p in pointwise if p["seq"] > since]
        if cfg.learner != "kto":
            new_labels = []  # DPO and rm-dpo learn from A/B choices only
        new_pairs, new_labels = _weigh(cfg, zeroed, new_pairs, new_labels)
        _crowd_metrics(r, cfg.learner, new_pairs + new_labels, zeroed)
        _enough_sources(cfg, r.metrics[f"crowd/{cfg.learner}_sources"], len(zeroed))
        if reward_model is None:  # rm-dpo's reward model saw every vote; DPO and KTO only those after `since`
            r.metrics["votes_since"] = since
        save = _direct(r, new_pairs, new_labels, reward_model, seed=cfg.seed + watermark)

    # 3. Publish atomically as a candidate; the caller decides whether it goes live.
    say("publishing", "saving the new version")
    metrics, live = r.metrics, r.live
    metrics.update({"watermark": watermark, "parent": live["version"] if live else BASE})
    version = recovery.next_version(store, registry)  # free on disk too: a crash may have left a folder
    path = registry.publish(version, save, meta={"parent": metrics["parent"], "metrics": metrics})
    store.add_adapter(version, str(path), parent=live["version"] if live else None, status="candidate", metrics=metrics)
    metrics["version"] = version
    r.mark("publish")
    # Serving's llama.cpp file for this version (the LoRA merged into the same base weights) is written here, in
    # training's time: the hot swap then only starts a server on it (~1 s instead of ~8 s of export).
    if prebuild_engine_file(cfg, r.bench.policy_model, path):
        r.mark("engine_file")
    marks = list(r.seconds.items())  # time of each stage: the wall clock between its mark and the previous one
    metrics.update({f"seconds/{k}": round(t - marks[i - 1][1], 2) for i, (k, t) in enumerate(marks) if i})
    metrics["seconds/round"] = round(marks[-1][1] - marks[0][1], 2)
    return metrics


def _fit_reward(r: _Round, pairs: list, ties: list, pointwise: list) -> RewardModel:
    """The round's reward model, fitted on every vote so far."""
    r.say("fitting reward model", "loading")
    reward_model = r.bench.new_reward_model()
    r.mark("reward_load")
    progress = lambda *a: (r.wait(), r.say("fitting reward model", _fmt(a)))  # noqa: E731
    fit = reward_model.fit(pairs, ties=ties, pointwise=pointwise, progress=progress)
    r.metrics.update({f"reward/{k}": v for k, v in fit.items()})
    r.mark("reward_fit")
    return reward_model


def _weigh(cfg: Config, zeroed: frozenset[str], *lists: list[dict]) -> tuple[list[dict], ...]:
    """Copies of the vote lists with each vote's weight: on --public, no source over max_source_share, zeroed get 0."""
    if not cfg.public:
        return lists  # one person testing locally trains as before: every vote weighs 1
    rows = [row for rows in lists for row in rows]
    weights = iter(crowd.capped_weights([row.get("voter_source") or "" for row in rows], cfg.max_source_share, zeroed))
    return tuple([{**row, "weight": next(weights)} for row in rows] for rows in lists)


def _flag_contrarians(
    r: _Round, store: Store, reward_model: RewardModel, weighted: tuple, statuses: dict, watermark: int
) -> frozenset[str]:
    """Sources newly flagged: each source's votes tested against a probe fitted on everyone else's (crowd.evidence)."""
    cfg = r.cfg
    if not cfg.public or not isinstance(reward_model, ProbeRewardModel):
        return frozenset()  # the LoRA reward model would need a fit per source: only the probe runs the test
    r.say("fitting reward model", "testing each source against everyone else's votes")
    # Every source with 2+ votes tells how well the others' model predicts a typical source; at most 64 of them (the
    # largest, so every source big enough to flag is among them) keep the test to seconds on a busy Space.
    probs = reward_model.held_out_probs(*weighted, min_votes=2, most=64)
    big = [s for s, p in probs.items() if len(p) >= cfg.flag_min_votes and statuses.get(s) != "cleared"]
    flagged: set[str] = set()
    typical, most = crowd.typical_agreement(probs), None
    # A trimmed consensus: the least-agreeing source is tested against how often the others agree with each other
    # when it is left out of every fit too. Otherwise a contrarian holding 25% of the weight sits in every honest
    # source's leave-out model and pulls the typical agreement to chance (measured: bench/RESULTS.md, Crowd).
    while big:
        worst = min(big, key=lambda s: crowd.agreement(probs[s]))
        others = reward_model.held_out_probs(*weighted, min_votes=2, most=64, without=frozenset(flagged | {worst}))
        typical = crowd.typical_agreement(others)
        ev = crowd.evidence(probs[worst], typical)
        most = ev.log_odds if most is None else most
        if not crowd.is_contrarian(ev, cfg.flag_min_votes, cfg.flag_odds):
            break  # the least-agreeing source is typical enough: so is everyone who agrees more
        store.flag_source(worst, votes=ev.votes, log_odds=ev.log_odds, agree=ev.agree, at_vote=watermark)
        flagged.add(worst)
        big.remove(worst)
        probs = {s: p for s, p in others.items() if s not in flagged}  # the next test's leave-out models skip it
        big = [s for s in big if s in probs]
    tested = sum(1 for s, p in probs.items() if len(p) >= cfg.flag_min_votes) + len(flagged)
    r.metrics.update({"crowd/tested": tested, "crowd/flagged": len(flagged), "crowd/typical_agreement": typical})
    if most is not None:
        r.metrics["crowd/max_log_odds"] = most
    r.mark("crowd_test")
    return frozenset(flagged)


def _enough_sources(cfg: Config, sources: int, left_out: int) -> None:
    """On --public, refuse a round whose votes come from too few sources for the share cap to hold."""
    need = crowd.sources_needed(cfg.min_round_sources, cfg.max_source_share)
    if cfg.public and sources < need:
        raise RewardDataError(
            f"The votes this round would learn from come from {sources} source{'s' if sources != 1 else ''} "
            f"({left_out} flagged or banned left out); a round needs {need}, so that none carries more than "
            f"{cfg.max_source_share:.0%}. It waits for more people to vote."
        )


def _crowd_metrics(r: _Round, what: str, rows: list[dict], zeroed: frozenset[str]) -> None:
    """How many sources the learner's votes came from, the largest one's share of its weight, votes weighted 0."""
    sources = [row.get("voter_source") or "" for row in rows]
    weights = [row.get("weight", 1.0) for row in rows]
    share = crowd.shares(sources, weights) if sum(weights) else {}
    r.metrics.update(
        {
            f"crowd/{what}_sources": len(share),
            f"crowd/{what}_largest_share": max(share.values(), default=0.0),
            f"crowd/{what}_zeroed_votes": sum(1 for s in sources if s in zeroed),
        }
    )


def _ppo(r: _Round, reward_model: RewardModel) -> Callable[[Path], None]:
    """PPO updates against the reward model; returns the function that saves the trained adapter."""
    cfg = r.cfg
    r.say("PPO", "loading policy copy")
    policy_model = r.bench.policy_copy(r.live_path)
    last_answers: list[str] = []
    last_prompts: list[list[dict]] = []

    def reward_fn(prompts, texts):
        last_answers[:] = texts
        last_prompts[:] = prompts
        return reward_model.score(prompts, texts, normalise=True)

    learner = PPOTrainer(policy_model, r.bench.tokenizer, cfg, reward_fn)
    if r.live_path:
        learner.load_value_head(r.live_path)
    r.mark("ppo_load")
    updates = []
    for i in range(cfg.ppo_updates_per_round):
        r.wait()
        r.say("PPO", f"update {i + 1}/{cfg.ppo_updates_per_round}")
        updates.append(learner.step([r.pool[r.rng.randrange(len(r.pool))] for _ in range(cfg.ppo_batch_size)]))
    ppo_metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[-1]}
    ppo_metrics["score_first"], ppo_metrics["score_last"] = updates[0]["score"], updates[-1]["score"]
    r.metrics.update({f"ppo/{k}": v for k, v in ppo_metrics.items()})
    # The gate reads the rollouts PPO sampled anyway: mean KL over the round, length of the last update's.
    r.metrics.update({"sample/kl": ppo_metrics["kl"], "sample/answer_tokens": updates[-1]["answer_tokens"]})
    r.metrics["sample/distinct2"] = _mean_distinct2(last_answers)
    r.metrics["sample/answered_rate"] = _answered_rate(last_prompts, last_answers)
    r.mark("ppo_updates")
    return learner.save_adapter


def _direct(r: _Round, pairs: list, pointwise: list, reward_model: RewardModel | None, seed: int):
    """DPO/KTO (through TRL) on the round's votes, plus reward-ranked pairs for rm-dpo; returns the save function."""
    cfg, name = r.cfg, r.cfg.learner.upper()
    r.say(name, "loading policy copy")
    policy_model = r.bench.policy_copy(r.live_path)
    r.mark("load")
    if reward_model is not None:
        r.say(name, f"sampling {cfg.rm_dpo_samples} answers for {cfg.rm_dpo_prompts} prompts")
        ranked, rank_metrics = _ranked_pairs(cfg, policy_model, r.bench.tokenizer, reward_model, r.pool, r.rng)
        r.metrics.update({f"{cfg.learner}/{k}": v for k, v in rank_metrics.items()})
        pairs = pairs + ranked
        r.mark("sample_pairs")
    say = lambda detail: r.say(name, detail)  # noqa: E731
    trained = train_direct(
        cfg.learner, policy_model, r.bench.tokenizer, cfg, pairs, pointwise, seed=seed, say=say, pause=r.wait
    )
    r.metrics.update({f"{cfg.learner}/{k}": v for k, v in trained.items()})
    r.mark("train")
    # What the gate needs, measured as PPO measures it: sampled answers, KL to the base, their length.
    r.say("evaluating", "sampling answers for the gate")
    sampler = PPOTrainer(policy_model, r.bench.tokenizer, cfg, reward_fn=None)
    prompts = [r.pool[r.rng.randrange(len(r.pool))] for _ in range(cfg.gate_prompts)]
    drift = sampler.drift(prompts)
    answers = drift.pop("answers")
    r.metrics["sample/distinct2"] = _mean_distinct2(answers)
    r.metrics["sample/answered_rate"] = _answered_rate(prompts, answers)
    r.metrics.update({f"sample/{k}": v for k, v in drift.items()})
    r.mark("sample")
    return sampler.save_adapter


def _ranked_pairs(cfg: Config, policy_model, tokenizer, reward_model, pool: list, rng: random.Random):
    """rm-dpo's pairs: the live policy's own samples for fresh prompts, best vs worst by the reward model."""
    sampler = PPOTrainer(policy_model, tokenizer, replace(cfg, ppo_temperature=cfg.rm_dpo_temperature), None)
    prompts = rng.sample(pool, min(cfg.rm_dpo_prompts, len(pool)))
    chunk = 64  # answers per generate() call: ~190 tok/s on 2 CPU cores at 64, ~90 at 8 (bench/RESULTS.md)

    def sample(repeated: list[list[dict]]) -> list[str]:
        return [a for i in range(0, len(repeated), chunk) for a in sampler.rollout(repeated[i : i + chunk])["answers"]]

    return reward_ranked_pairs(
        prompts, sample, reward_model.score, cfg.rm_dpo_samples, cfg.rm_dpo_min_confidence, reward_model.prob_better
    )


def _mean_distinct2(answers: list[str]) -> float:
    """Mean per-answer distinct-2 of sampled answers (1.0 for none): the gate's degeneracy signal."""
    return sum(distinct_n(a) for a in answers) / len(answers) if answers else 1.0


def _answered_rate(prompts: list[list[dict]], answers: list[str]) -> float:
    """Share of sampled answers that say something (`is_answer`; 1.0 for none): the gate's parroting signal."""
    return sum(is_answer(p, a) for p, a in zip(prompts, answers)) / len(answers) if answers else 1.0


def _fmt(args: tuple) -> str:
    """Reward-fit progress as 'step 3/46, loss 0.69' (whatever the reward model reports)."""
    info = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
    if "step" in info and "steps" in info:
        loss = f", loss {info['loss']:.3f}" if isinstance(info.get("loss"), float) else ""
        return f"step {info['step']}/{info['steps']}{loss}"
    return " ".join(str(a) for a in args)


def gate(cfg: Config, metrics: dict) -> None:
    """Refuse to make a round live when it drifted too far, or its answers collapsed or repeat (TrainingRejected)."""
    # (metric, refuse when it is over (+1) or under (-1) the limit, limit, why), checked in this order.
    checks = [
        (
            "sample/kl",
            +1,
            cfg.max_kl_per_answer,
            "mean KL to the base model {v:.2f} nats per answer is over the gate of {g}",
        ),
        # A reward model fitted on "shorter won" votes scores an empty answer highest; its KL can stay under the gate
        # (measured: 19.6 nats, 0 words, bench/RESULTS.md ## Simulated raters), so length is gated on its own.
        ("sample/answer_tokens", -1, cfg.min_answer_tokens, "answers shrank to {v:.1f} tokens on average (gate: {g})"),
        # Reward hacking by repetition ("I'm so glad! I'm so glad! ...") kept KL near the gate while distinct-2 fell
        # from 0.93 to 0.62 (bench/RESULTS.md ## Simulated raters, cheerful): a degenerate round is refused on its own.
        (
            "sample/distinct2",
            -1,
            cfg.min_distinct2,
            "answers repeat themselves: mean distinct-2 {v:.2f} is under the gate of {g}",
        ),
        # Rewarded for brevity, PPO went live answering "What is X?" with "What is X" or its system prompt for 11 of
        # 32 held-out prompts (bench/RESULTS.md ## Learners): short, fluent-looking, and not an answer.
        (
            "sample/answered_rate",
            -1,
            cfg.min_answered_rate,
            "only {v:.0%} of sampled answers say something (the rest are blank or repeat the question or "
            "system prompt; gate: {g:.0%})",
        ),
    ]
    for metric, side, limit, why in checks:
        value = metrics.get(metric)
        if value is not None and side * (value - limit) > 0:
            raise TrainingRejected(why.format(v=value, g=limit) + ": the version stays a candidate.")


def run_round(cfg: Config, store: Store, **kwargs) -> dict:
    """A round recorded in training_runs; on success the new version goes live (the old one is retired)."""
    with recovery.trainer_lock(cfg.data_dir):  # one round at a time per data dir, across processes
        return _recorded_round(cfg, store, **kwargs)


def _recorded_round(cfg: Config, store: Store, **kwargs) -> dict:
    run_id = store.start_run("round", owner=recovery.owner())
    try:
        metrics = train_round(cfg, store, **kwargs)
        (kwargs.get("progress") or (lambda stage, detail: None))("gate", "checking the new version")
        gate(cfg, metrics)
        old = store.live_adapter()
        if old:
            store.set_adapter_status(old["version"], "retired")
        store.set_adapter_status(metrics["version"], "live")
    except ROUND_FAILURES as exc:
        store.finish_run(run_id, "failed", error=str(exc))
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    store.finish_run(run_id, "ok", metrics)
    return metrics


def train_once(cfg: Config) -> dict:
    """`rlhf-live train --once`: one round on the DB at cfg.data_dir; the new version goes live."""
    store = Store.from_config(cfg)
    for note in recovery.reconcile(store, AdapterRegistry(cfg.adapters_dir)):
        print(f"[train] {note}", flush=True)
    return run_round(cfg, store, progress=lambda stage, detail: print(f"[train] {stage}: {detail}", flush=True))


def round_due(cfg: Config, store: Store, since: int) -> bool:
    """Enough new votes after watermark `since` for a round, and on a public deployment from enough sources."""
    upto = store.watermark()
    if upto - since < cfg.train_min_new_votes:
        return False
    # One person with many sessions is still one source: their votes alone never start a round.
    need = crowd.sources_needed(cfg.min_round_sources, cfg.max_source_share)
    return not cfg.public or store.sources_between(since, upto) >= need


def watch(cfg: Config, *, rounds: int | None = None, stop: threading.Event | None = None, hub=None) -> None:
    """`rlhf-live train --watch`: a round whenever train_min_new_votes new votes arrive; a JSON line per round."""
    # The trainer as its own process beside `serve --no-train`, on the same data dir.
    import json

    store, bench, stop = Store.from_config(cfg), Workbench(cfg), stop or threading.Event()
    for note in recovery.reconcile(store, AdapterRegistry(cfg.adapters_dir)):
        print(f"[train] {note}", flush=True)
    live = store.live_adapter()
    seen = int((live or {}).get("metrics", {}).get("watermark", 0)) if live else 0
    done = 0
    while not stop.is_set() and (rounds is None or done < rounds):
        if round_due(cfg, store, seen):
            seen = store.watermark()  # a failed round is not retried on the same votes
            try:
                metrics = run_round(cfg, store, bench=bench)
                recovery.prune(store, cfg.keep_versions)
                if hub is not None and hub.enabled:
                    hub.push_live(store, metrics["version"], store.adapter(metrics["version"])["path"]).join()
                print(json.dumps({"version": metrics["version"], "status": "live", **_headline(metrics)}), flush=True)
            except ROUND_FAILURES as exc:
                print(json.dumps({"status": "failed", "error": str(exc)}), flush=True)
            done += 1
        stop.wait(cfg.train_check_s)


def _headline(metrics: dict) -> dict:
    """The numbers a person watching `train --watch` wants per round."""
    keys = ("learner", "watermark", "sample/kl", "reward/accuracy", "seconds/round")
    return {k: metrics[k] for k in keys if k in metrics}


class Follower:
    """Serving beside a trainer in another process: swaps in whatever version the DB says is live (polled)."""

    def __init__(self, cfg: Config, store: Store, policy: Policy):
        self.cfg, self.store, self.policy = cfg, store, policy
        self._stop = threading.Event()
        self.last_error = ""

    def check(self) -> bool:
        """Serve the DB's live version if it is not what serves now; True when something was swapped."""
        live = self.store.live_adapter()
        version, path = (live["version"], live["path"]) if live else (BASE, None)
        if version == self.policy.version or (path is not None and not Path(path).is_dir()):
            return False
        try:
            self.policy.swap(path, version)
        except Exception as exc:  # serving goes on with what it has
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self.last_error = ""
        return True

    def start(self) -> None:
        """Poll every follow_check_s in a daemon thread until stop()."""
        threading.Thread(target=self._loop, name="follower", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.follow_check_s):
            self.check()


class Trainer:
    """Background thread: trains when enough new votes arrived (or on request) and hot-swaps the served adapter."""

    _IDLE = {"stage": 0, "stages": 0, "step": None, "steps": None, "round_started": None, "stage_started": None}
    """Progress fields while no round runs (times are Unix seconds)."""

    def __init__(self, cfg: Config, store: Store, policy: Policy, hub=None):
        self.cfg, self.store, self.policy, self.hub = cfg, store, policy, hub
        self.bench = Workbench(cfg)
        self._round = threading.Lock()  # a round and a rollback never interleave
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._force = False
        self._thread: threading.Thread | None = None
        live = store.live_adapter()
        last = (live or {}).get("metrics") or {}
        self._status = {
            "state": "idle",
            "progress": "",
            "running": False,
            "watermark": int(last.get("watermark", 0)) if isinstance(last, dict) else 0,
            "last_error": "",
            "rounds": 0,
            **self._IDLE,
        }

    def reward_model(self) -> RewardModel | None:
        """The last round's fitted reward model (None before the first round, and for learners without one)."""
        return self.bench.reward_model if self.cfg.learner in ("ppo", "rm-dpo") else None

    def status(self) -> dict:
        """State for the dashboard: idle or a stage of `round_stages`, with progress, stage k of n, times, last error.

        While a round runs: `stage` (1-based) of `stages`, `step`/`steps` within the stage when its detail says
        ('update 3/8'), `round_started` and `stage_started` (Unix seconds).
        """
        return dict(self._status)

    def _progress(self, state: str, detail: str) -> None:
        """Record what the round is doing; a new state starts a new stage (its clock starts now)."""
        plan = round_stages(self.cfg.learner)
        stage = plan.index(state) + 1 if state in plan else self._status["stage"]
        step = re.search(r"(\d+)/(\d+)", detail or "")
        update = {"state": state, "progress": detail, "stage": stage, "stages": len(plan)}
        if stage != self._status["stage"]:
            update["stage_started"] = time.time()
        update["step"], update["steps"] = (int(step[1]), int(step[2])) if step else (None, None)
        self._status.update(update)

    def start(self) -> None:
        """Run rounds in a daemon thread until stop()."""
        self._status["running"] = True
        self._thread = threading.Thread(target=self._loop, name="trainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end after its current step."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the thread has ended (after stop())."""
        if self._thread is not None:
            self._thread.join(timeout)

    def request_round(self) -> str:
        """Admin: train now, whatever the vote count."""
        self._force = True
        self._wake.set()
        return "A training round was requested; watch the state above."

    def rollback(self, version: str) -> str:
        """Admin: serve an earlier version (or 'base') again; the current one is marked rolled_back."""
        if not self._round.acquire(blocking=False):
            raise InvalidRequest("A training round is running: roll back when it has finished (see the state above).")
        try:
            current = self.store.live_adapter()
            if version == BASE:
                self.policy.swap(None, BASE)
            else:
                row = self.store.adapter(version)
                self.policy.swap(row["path"], version)
                self.store.set_adapter_status(version, "live")
            if current and current["version"] != version:
                self.store.set_adapter_status(current["version"], "rolled_back")
            return f"Now serving {version}."
        finally:
            self._round.release()

    def _yield_to_serving(self) -> None:
        """Serving has priority: on 2 cores, wait between training steps while someone is waiting for tokens."""
        waited = 0.0
        while self.policy.generating and waited < self.cfg.train_max_yield_s and not self._stop.is_set():
            time.sleep(0.2)
            waited += 0.2
        if self._stop.is_set():
            raise TrainingStopped("The trainer was stopped before this round finished; nothing was published.")

    def run_once(self) -> dict:
        """One round now, in this thread: train, gate, go live, hot-swap; a failure is recorded and raised."""
        with self._round:
            try:
                before = self.store.live_adapter()
                self._status.update(round_started=time.time(), stage=0)
                metrics = run_round(
                    self.cfg, self.store, progress=self._progress, pause=self._yield_to_serving, bench=self.bench
                )
                self._progress("going live", "switching serving to the new version")
                self._swap_in(metrics["version"], before)
                removed = recovery.prune(self.store, self.cfg.keep_versions)
                metrics["pruned"] = removed
                if self.hub is not None and self.hub.enabled:
                    self.hub.push_live(self.store, metrics["version"], self.store.adapter(metrics["version"])["path"])
                self._status.update(
                    last_error="", watermark=int(metrics["watermark"]), rounds=self._status["rounds"] + 1
                )
                return metrics
            except Exception as exc:
                self._status["last_error"] = f"{type(exc).__name__}: {exc}"
                self._status["watermark"] = self.store.watermark()  # do not retry the same data in a loop
                raise
            finally:
                self._status.update(state="idle", progress="", **self._IDLE)

    def _swap_in(self, version: str, before: dict | None) -> None:
        """Serve the round's new version; if it cannot be served, the DB goes back to saying what serves."""
        try:
            self.policy.swap(self.store.adapter(version)["path"], version)
        except Exception:
            self.store.set_adapter_status(version, "rolled_back")
            if before is not None and before["version"] == self.policy.version:
                self.store.set_adapter_status(before["version"], "live")
            raise

    def _ready(self) -> bool:
        return round_due(self.cfg, self.store, self._status["watermark"])

    def _loop(self) -> None:
        # Lower this thread's CPU priority before it starts any torch work: the OpenMP threads torch then starts for
        # it inherit the niceness, so on a busy machine the kernel gives serving's threads the cores first.
        if self.cfg.train_nice > 0 and hasattr(os, "setpriority"):
            with contextlib.suppress(OSError):  # not permitted here: training then competes as an equal
                me = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + self.cfg.train_nice))
        while not self._stop.is_set():
            self._wake.wait(self.cfg.train_check_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            if not self._force and not self._ready():
                continue
            self._force = False
            try:
                self.run_once()
            except TrainingStopped:
                break
            except Exception:  # serving must survive any training failure
                traceback.print_exc()
