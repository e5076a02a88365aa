"""One training round, top to bottom: votes -> (reward model, crowd checks) -> learner -> candidate version.

Knows the order of a round's stages, the crowd rules a public round follows and how a round is recorded; knows nothing
of threads, Gradio or serving: a published version (adapter folder + DB row) is all it hands on, and `engine_file`,
when given, turns the trained copy into serving's engine file in training's time.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.learning import crowd
from rlhf_live.learning.copies import TrainingCopies
from rlhf_live.learning.direct import DirectDivergence, reward_ranked_pairs, train_direct
from rlhf_live.learning.gate import TrainingRejected, answered_rate, gate, mean_distinct2
from rlhf_live.learning.learners import learner as learner_named
from rlhf_live.learning.ppo import PPODivergence, PPOTrainer
from rlhf_live.learning.reward.base import Scorer
from rlhf_live.learning.reward.data import RewardDataError
from rlhf_live.learning.reward.probe import ProbeRewardModel
from rlhf_live.learning.rollout import Rollouts, load_seed_prompts
from rlhf_live.model.lora import BASE
from rlhf_live.model.prompt import with_system
from rlhf_live.store import Store, recovery
from rlhf_live.store.folders import AdapterRegistry

Progress = Callable[[str, str], None]
"""progress(state, detail): the round's stage (one of `round_stages`) and what it is doing, e.g. 'update 3/8'."""


EngineFile = Callable[[object, Path], bool]
"""engine_file(trained_model, version_folder): write serving's engine file for a published version (True if written)."""


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
    # As many prompts as the round samples answers: with k answers per prompt the round draws fewer prompts, and a
    # pool cut to those alone would be a handful of seed prompts on a fresh app.
    need = cfg.ppo_batch_size * max(1, cfg.ppo_samples_per_prompt) * cfg.ppo_updates_per_round
    if cfg.public:  # enough seed prompts beside the largest asker's that it holds at most its share
        largest = max(Counter(a for a, _ in asked if a).values(), default=0)
        need = max(need, math.ceil(largest / cfg.max_source_share))
    need = max(0, need - len(real))
    return real + seeds[:need] if need else real


@dataclass
class _Round:
    """What every stage of one round shares: settings, models, the prompt pool, progress and the metrics so far."""

    cfg: Config
    copies: TrainingCopies
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

    def step(self, stage: str) -> Callable[[str], None]:
        """What a stage's learner calls after each step: serving goes first (wait), then the detail is reported."""
        return lambda detail: (self.wait(), self.say(stage, detail))[1]

    def mark(self, stage: str) -> None:
        """The wall clock at the end of `stage` (its time is the gap to the previous mark)."""
        self.seconds[stage] = time.perf_counter()


def train_round(
    cfg: Config,
    store: Store,
    *,
    progress: Progress | None = None,
    pause: Callable[[], None] | None = None,
    copies: TrainingCopies | None = None,
    engine_file: EngineFile | None = None,
) -> dict:
    """One round on the store's feedback; publishes a candidate version and returns its metrics."""
    learner = learner_named(cfg.learner)
    copies = copies or TrainingCopies(cfg)
    registry = AdapterRegistry(cfg.adapters_dir)
    registry.clean_partial()
    watermark = store.watermark()
    rng = random.Random(cfg.seed + watermark)
    torch.manual_seed(cfg.seed + watermark)
    pool = _prompt_pool(store, cfg, rng, copies.exclude_prompts)
    say, wait = progress or (lambda stage, detail: None), pause or (lambda: None)
    r = _Round(cfg, copies, rng, pool, store.live_adapter(), say, wait, metrics={"learner": cfg.learner})
    pairs, ties, pointwise = store.preference_pairs(), store.ties(), store.pointwise_labels()
    statuses = store.source_statuses() if cfg.public else {}
    zeroed = frozenset(s for s, status in statuses.items() if status in ("flagged", "banned"))

    # 1. Reward model (PPO, rm-dpo): re-fit on every vote (they are few; a fresh fit avoids drifting on old data).
    reward_model = None
    if learner.reward_model:
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
        new_pairs, new_labels = [p for p in pairs if p.seq > since], [p for p in pointwise if p.seq > since]
        if not learner.thumbs:
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
    version = store.next_version(registry.versions())  # free on disk too: a crash may have left a folder
    path = registry.publish(version, save, meta={"parent": metrics["parent"], "metrics": metrics})
    store.add_adapter(version, str(path), parent=live["version"] if live else None, status="candidate", metrics=metrics)
    metrics["version"] = version
    r.mark("publish")
    # Serving's llama.cpp file for this version (the LoRA merged into the same base weights) is written here, in
    # training's time: the hot swap then only starts a server on it (~1 s instead of ~8 s of export).
    if engine_file is not None and engine_file(r.copies.policy_model, path):
        r.mark("engine_file")
    marks = list(r.seconds.items())  # time of each stage: the wall clock between its mark and the previous one
    metrics.update({f"seconds/{k}": round(t - marks[i - 1][1], 2) for i, (k, t) in enumerate(marks) if i})
    metrics["seconds/round"] = round(marks[-1][1] - marks[0][1], 2)
    return metrics


def _fit_reward(r: _Round, pairs: list, ties: list, pointwise: list) -> Scorer:
    """The round's reward model, fitted on every vote so far."""
    r.say("fitting reward model", "loading")
    reward_model = r.copies.new_reward_model()
    r.mark("reward_load")
    fit = reward_model.fit(pairs, ties=ties, pointwise=pointwise, progress=r.step("fitting reward model"))
    r.metrics.update({f"reward/{k}": v for k, v in fit.items()})
    r.mark("reward_fit")
    return reward_model


def _weigh(cfg: Config, zeroed: frozenset[str], *lists: list[dict]) -> tuple[list[dict], ...]:
    """Copies of the vote lists with each vote's weight: on --public, no source over max_source_share, zeroed get 0."""
    if not cfg.public:
        return lists  # one person testing locally trains as before: every vote weighs 1
    rows = [row for rows in lists for row in rows]
    weights = iter(crowd.capped_weights([row.voter_source for row in rows], cfg.max_source_share, zeroed))
    return tuple([replace(row, weight=next(weights)) for row in rows] for rows in lists)


def _flag_contrarians(
    r: _Round, store: Store, reward_model: Scorer, weighted: tuple, statuses: dict, watermark: int
) -> frozenset[str]:
    """Sources newly flagged: each source's votes tested against a probe fitted on everyone else's (crowd.evidence)."""
    cfg = r.cfg
    if not cfg.public or not isinstance(reward_model, ProbeRewardModel):
        return frozenset()  # the LoRA reward model would need a fit per source: only the probe runs the test
    r.say("fitting reward model", "testing each source against everyone else's votes")

    # Every source with 2+ votes calibrates the others' model; at most 64 of them (the largest, so every source big
    # enough to flag is among them) keep the test to seconds on a busy Space.
    def held_out(without: frozenset[str]) -> dict[str, list[float]]:
        return reward_model.held_out_probs(*weighted, min_votes=2, most=64, without=without)

    cleared = frozenset(s for s, status in statuses.items() if status == "cleared")
    test = crowd.trimmed_test(held_out, cleared, cfg.flag_min_votes, cfg.flag_odds)
    for source, ev in test.flagged.items():
        store.flag_source(source, votes=ev.votes, log_odds=ev.log_odds, agree=ev.agree, at_vote=watermark)
    r.metrics.update({"crowd/tested": test.tested, "crowd/flagged": len(test.flagged), "crowd/calibration": test.beta})
    if test.most is not None:
        r.metrics["crowd/max_log_odds"] = test.most
    r.mark("crowd_test")
    return frozenset(test.flagged)


def _enough_sources(cfg: Config, sources: int, left_out: int) -> None:
    """On --public, refuse a round whose votes come from too few sources for the share cap to hold."""
    need = cfg.sources_per_round()
    if cfg.public and sources < need:
        raise RewardDataError(
            f"The votes this round would learn from come from {sources} source{'s' if sources != 1 else ''} "
            f"({left_out} flagged or banned left out); a round needs {need}, so that none carries more than "
            f"{cfg.max_source_share:.0%}. It waits for more people to vote."
        )


def _crowd_metrics(r: _Round, what: str, rows: list[dict], zeroed: frozenset[str]) -> None:
    """How many sources the learner's votes came from, the largest one's share of its weight, votes weighted 0."""
    sources = [row.voter_source for row in rows]
    weights = [row.weight for row in rows]
    share = crowd.shares(sources, weights) if sum(weights) else {}
    r.metrics.update(
        {
            f"crowd/{what}_sources": len(share),
            f"crowd/{what}_largest_share": max(share.values(), default=0.0),
            f"crowd/{what}_zeroed_votes": sum(1 for s in sources if s in zeroed),
        }
    )


def _ppo(r: _Round, reward_model: Scorer) -> Callable[[Path], None]:
    """PPO updates against the reward model; returns the function that saves the trained adapter."""
    cfg = r.cfg
    r.say("PPO", "loading policy copy")
    policy_model = r.copies.policy_copy(r.live_path)
    last_answers: list[str] = []
    last_prompts: list[list[dict]] = []
    spreads: list[float] = []  # the ensemble's spread on each answer of the last rollout

    def reward_fn(prompts, texts):
        last_answers[:] = texts
        last_prompts[:] = prompts
        scores = reward_model.score(prompts, texts, normalise=True)  # (B,)
        members = reward_model.member_scores(prompts, texts)  # (B, K) or None: no ensemble
        if members is None or members.shape[1] < 2:
            return scores
        spread = members.std(1)  # (B,)
        spreads[:] = spread.tolist()
        # Pessimism (Coste et al., arXiv 2310.02743): the fit on all votes, less what the votes leave open.
        return scores - cfg.reward_pessimism * spread

    learner = PPOTrainer(policy_model, r.copies.tokenizer, cfg, reward_fn)
    if r.live_path:
        learner.load_value_head(r.live_path)
    r.mark("ppo_load")
    updates, step = [], r.step("PPO")
    for i in range(cfg.ppo_updates_per_round):
        step(f"update {i + 1}/{cfg.ppo_updates_per_round}")
        updates.append(learner.step([r.pool[r.rng.randrange(len(r.pool))] for _ in range(cfg.ppo_batch_size)]))
    ppo_metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[-1]}
    ppo_metrics["score_first"], ppo_metrics["score_last"] = updates[0]["score"], updates[-1]["score"]
    r.metrics.update({f"ppo/{k}": v for k, v in ppo_metrics.items()})
    # The gate reads the rollouts PPO sampled anyway: mean KL over the round, length of the last update's.
    r.metrics.update({"sample/kl": ppo_metrics["kl"], "sample/answer_tokens": updates[-1]["answer_tokens"]})
    r.metrics["sample/distinct2"] = mean_distinct2(last_answers)
    r.metrics["sample/answered_rate"] = answered_rate(last_prompts, last_answers)
    _spread_metric(r, reward_model, spreads)
    r.mark("ppo_updates")
    return learner.save_adapter


def _spread_metric(r: _Round, reward_model: Scorer, spreads: list[float]) -> None:
    """sample/reward_spread: the ensemble's mean spread on the sampled answers over its spread on the voted ones."""
    # Recorded, not gated: on the three known hacks it overlapped honest versions (bench/RESULTS.md, issue 23).
    if spreads and reward_model.norm_spread:
        r.metrics["sample/reward_spread"] = sum(spreads) / len(spreads) / reward_model.norm_spread


def _direct(r: _Round, pairs: list, pointwise: list, reward_model: Scorer | None, seed: int):
    """DPO/KTO (through TRL) on the round's votes, plus reward-ranked pairs for rm-dpo; returns the save function."""
    cfg, name = r.cfg, r.cfg.learner.upper()
    r.say(name, "loading policy copy")
    policy_model = r.copies.policy_copy(r.live_path)
    r.mark("load")
    if reward_model is not None:
        r.say(name, f"sampling {cfg.rm_dpo_samples} answers for {cfg.rm_dpo_prompts} prompts")
        ranked, rank_metrics = _ranked_pairs(cfg, policy_model, r.copies.tokenizer, reward_model, r.pool, r.rng)
        r.metrics.update({f"{cfg.learner}/{k}": v for k, v in rank_metrics.items()})
        pairs = pairs + ranked
        r.mark("sample_pairs")
    trained = train_direct(
        cfg.learner, policy_model, r.copies.tokenizer, cfg, pairs, pointwise, seed=seed, progress=r.step(name)
    )
    r.metrics.update({f"{cfg.learner}/{k}": v for k, v in trained.items()})
    r.mark("train")
    # What the gate needs, measured as PPO measures it: sampled answers, KL to the base, their length.
    r.say("evaluating", "sampling answers for the gate")
    sampler = Rollouts(policy_model, r.copies.tokenizer, cfg)
    prompts = [r.pool[r.rng.randrange(len(r.pool))] for _ in range(cfg.gate_prompts)]
    drift = sampler.drift(prompts)
    answers = drift.pop("answers")
    r.metrics["sample/distinct2"] = mean_distinct2(answers)
    r.metrics["sample/answered_rate"] = answered_rate(prompts, answers)
    r.metrics.update({f"sample/{k}": v for k, v in drift.items()})
    if reward_model is not None:
        members = reward_model.member_scores(prompts, answers)
        _spread_metric(r, reward_model, [] if members is None else members.std(1).tolist())
    r.mark("sample")
    return sampler.save_adapter


def _ranked_pairs(cfg: Config, policy_model, tokenizer, reward_model, pool: list, rng: random.Random):
    """rm-dpo's pairs: the live policy's own samples for fresh prompts, best vs worst by the reward model."""
    sampler = Rollouts(policy_model, tokenizer, replace(cfg, ppo_temperature=cfg.rm_dpo_temperature))
    prompts = rng.sample(pool, min(cfg.rm_dpo_prompts, len(pool)))
    chunk = 64  # answers per generate() call: ~190 tok/s on 2 CPU cores at 64, ~90 at 8 (bench/RESULTS.md)

    def sample(repeated: list[list[dict]]) -> list[str]:
        return [a for i in range(0, len(repeated), chunk) for a in sampler.rollout(repeated[i : i + chunk])["answers"]]

    return reward_ranked_pairs(
        prompts, sample, reward_model.score, cfg.rm_dpo_samples, cfg.rm_dpo_min_confidence, reward_model.prob_better
    )


def run_round(cfg: Config, store: Store, **kwargs) -> dict:
    """A round recorded in training_runs; on success the new version goes live (the old one is retired)."""
    with recovery.trainer_lock(cfg.data_dir):  # one round at a time per data dir, across processes
        return _recorded_round(cfg, store, **kwargs)


def _recorded_round(cfg: Config, store: Store, **kwargs) -> dict:
    run_id = store.start_run("round", owner=recovery.owner())
    beat = getattr(store, "heartbeat", None)  # a followed app (learning/remote.py) hears how the round goes
    if beat is not None:
        kwargs["progress"] = _beating(kwargs.get("progress"), lambda stage, detail: beat(run_id, stage, detail))
    try:
        metrics = train_round(cfg, store, **kwargs)
        (kwargs.get("progress") or (lambda stage, detail: None))("gate", "checking the new version")
        gate(cfg, metrics)
        store.set_adapter_status(metrics["version"], "live")  # retires the old live version in the same step
    except ROUND_FAILURES as exc:
        store.finish_run(run_id, "failed", error=str(exc))
        raise
    except BaseException as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    store.finish_run(run_id, "ok", metrics)
    return metrics


def _beating(progress: Progress | None, beat: Progress, every_s: float = 10.0) -> Progress:
    """`progress`, and `beat` at a new stage or at most every `every_s` seconds."""
    last = {"stage": None, "at": 0.0}

    def report(stage: str, detail: str) -> None:
        if progress is not None:
            progress(stage, detail)
        if stage != last["stage"] or time.monotonic() - last["at"] >= every_s:
            last.update(stage=stage, at=time.monotonic())
            beat(stage, detail)

    return report
