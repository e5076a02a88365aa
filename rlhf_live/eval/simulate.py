"""The live loop driven by a simulated rater: votes through the Service, a round every K votes, evaluation per round.

Knows the order of a simulated run (vote on Compare pairs of the live version as a person would, train with the
app's own Trainer and gates, evaluate on held-out prompts, plot the learning curve); knows nothing of Gradio or SQL.
The rater (raters.py) never sees which answer came from which version, and the held-out prompts are never voted on
nor used for PPO rollouts.
"""

from __future__ import annotations

import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from rlhf_live.config import Config
from rlhf_live.eval.evaluation import Evaluator
from rlhf_live.eval.raters import Rater, load_rater
from rlhf_live.learning.rollout import load_seed_prompts
from rlhf_live.serving.service import Service
from rlhf_live.serving.settings import GenerationSettings

SUMMARY_KEYS = ("win_rate", "win_rate_ci", "kl", "answer_words", "eos_rate", "distinct2", "fluent")


def _say(msg: str) -> None:
    print(f"[simulate] {msg}", file=sys.stderr, flush=True)


def split_prompts(n_eval: int, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """(held-out prompts for evaluation, prompts to vote on) from the seed prompts, shuffled with `seed`."""
    prompts = load_seed_prompts()
    random.Random(seed).shuffle(prompts)
    if not 0 < n_eval < len(prompts):
        raise ValueError(f"--eval-prompts must be between 1 and {len(prompts) - 1}, got {n_eval}.")
    return prompts[:n_eval], prompts[n_eval:]


def _vote(service: Service, voter: str, rater: Rater, prompt: list[dict], settings, thumbs: bool) -> str:
    """One Compare pair of the live version, judged by the rater through the same calls a person's vote makes."""
    *_, pair = service.compare(voter, prompt[-1]["content"], settings=settings)
    a, b = pair["a"], pair["b"]
    choice = rater(prompt, a["text"], b["text"])
    service.choose(voter, pair["pair_id"], choice, reason=f"simulated rater {rater.name}")
    if thumbs:
        for answer, thumb in zip((a, b), rater.thumbs_for(prompt, a["text"], b["text"], choice)):
            if thumb:
                service.feedback(voter, answer["response_id"], thumb)
    return choice


def simulate(
    cfg: Config,
    rater_spec: str,
    votes: int,
    *,
    round_every: int = 40,
    eval_prompts: int = 48,
    out: str | Path | None = None,
    thumbs: bool = False,
) -> dict:
    """Run `votes` simulated votes with a training round every `round_every`; the learning curve as a dict."""
    from rlhf_live.runtime import assemble  # heavy: only when simulating

    if votes < 1 or round_every < 1:
        raise ValueError("--votes and --round-every must be at least 1.")
    rater = load_rater(rater_spec)
    start = time.perf_counter()
    held_out, vote_prompts = split_prompts(eval_prompts, cfg.seed)
    # One simulated voter, fast: no per-minute limit; nothing starts in the background (rounds run in this thread).
    app = assemble(replace(cfg, max_requests_per_minute=0, train=True), hub=False, start=False, say=_say)
    policy, trainer, service = app.policy, app.trainer, app.service
    trainer.copies.exclude_prompts = frozenset(p[-1]["content"] for p in held_out)
    voter = service.voter(f"simulated:{rater.name}")
    # Votes, rollouts and evaluation all see answers of the same length.
    settings = GenerationSettings.from_config(cfg, max_new_tokens=cfg.ppo_max_new_tokens)
    eval_settings = GenerationSettings.from_config(cfg, max_new_tokens=cfg.ppo_max_new_tokens, seed=cfg.seed)
    evaluator = Evaluator(policy, rater, held_out, eval_settings, seed=cfg.seed)
    seconds = {"votes": 0.0, "training": 0.0, "evaluation": time.perf_counter() - start}
    counts = {"A": 0, "B": 0, "tie": 0}
    history = [_entry(0, 0, counts, evaluator.evaluate() | {"status": "base"}, {}, seconds, start)]
    samples = {"round 0": history[0].pop("samples")}
    _say(_line(history[0]))

    # As many simulated people vote at once as the app generates for at once (Config.generation_concurrency).
    with ThreadPoolExecutor(max(1, cfg.generation_concurrency), thread_name_prefix="voter") as pool:
        for first in range(0, votes, round_every):
            t0 = time.perf_counter()
            block = [vote_prompts[i % len(vote_prompts)] for i in range(first, min(first + round_every, votes))]
            for choice in pool.map(lambda p: _vote(service, voter, rater, p, settings, thumbs), block):
                counts[choice] += 1
            seconds["votes"] += time.perf_counter() - t0
            if len(block) < round_every:
                break  # a partial block at the end: collected, not trained on
            t0 = time.perf_counter()
            metrics, status = _round(trainer)
            seconds["training"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            result = evaluator.evaluate(trainer.copies.reward_model) | {"status": status}
            seconds["evaluation"] += time.perf_counter() - t0
            history.append(_entry(len(history), first + len(block), counts, result, metrics, seconds, start))
            samples[f"round {len(history) - 1}"] = history[-1].pop("samples")
            _say(_line(history[-1]))

    last = history[-1]
    summary = {
        "rater": rater.name,
        "learner": cfg.learner,
        "votes": votes,
        "round_every": round_every,
        "eval_prompts": len(held_out),
        "rounds": len(history) - 1,
        "informative_votes": counts["A"] + counts["B"],
        "choices": counts,
        "thumbs": thumbs,
        **{k: last[k] for k in SUMMARY_KEYS},
        "version": last["version"],
        "base": evaluator.base,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()},
        "history": history,
    }
    if out is not None:
        _write(Path(out), summary, samples)
    return summary


def _round(trainer) -> tuple[dict, str]:
    """One training round now: (its metrics, 'live'), or ({error}, 'rejected' by the gate or 'failed')."""
    from rlhf_live.learning.gate import TrainingRejected
    from rlhf_live.learning.round import ROUND_FAILURES

    try:
        return trainer.run_once(), "live"
    except TrainingRejected as exc:
        return {"error": str(exc)}, "rejected"
    except ROUND_FAILURES as exc:
        return {"error": str(exc)}, "failed"


def _entry(n: int, votes: int, counts: dict, result: dict, metrics: dict, seconds: dict, start: float) -> dict:
    """One round's line of the learning curve."""
    return {
        "round": n,
        "votes": votes,
        "informative_votes": counts["A"] + counts["B"],
        **result,
        "reward_heldout_accuracy": metrics.get("reward/accuracy"),
        "ppo_score_first": metrics.get("ppo/score_first"),
        "ppo_score_last": metrics.get("ppo/score_last"),
        "ppo_kl": metrics.get("ppo/kl"),
        "reward_spread": metrics.get("sample/reward_spread"),
        "train_loss_first": next((v for k, v in metrics.items() if k.endswith("/loss_first")), None),
        "train_loss_last": next((v for k, v in metrics.items() if k.endswith("/loss_last")), None),
        "error": metrics.get("error", ""),
        "round_seconds": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("seconds/")},
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()},
    }


def _line(e: dict) -> str:
    lo, hi = e["win_rate_ci"]
    acc = e["reward_accuracy_on_rater"]
    return (
        f"round {e['round']} after {e['votes']} votes ({e['informative_votes']} informative): {e['version']} "
        f"{e['status']}, win-rate {e['win_rate']:.2f} [{lo:.2f}, {hi:.2f}], KL {e['kl']:.2f}, "
        f"{e['answer_words']:.0f} words, EOS {e['eos_rate']:.2f}, distinct-2 {e['distinct2']:.2f}, "
        f"RM accuracy on rater {'-' if acc is None else f'{acc:.2f}'}, {e['seconds']:.0f} s"
    )


def _write(out: Path, summary: dict, samples: dict) -> None:
    """OUT/result.json, OUT/samples.json (every evaluated answer) and OUT/curve.png."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False))
    plot_curve(summary, out / "curve.png")


def plot_curve(summary: dict, path: Path) -> None:
    """Win-rate vs the base (95% band) and KL to the base against votes, one figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    h = summary["history"]
    x = [e["votes"] for e in h]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 2))
    top.fill_between(x, [e["win_rate_ci"][0] for e in h], [e["win_rate_ci"][1] for e in h], alpha=0.2)
    top.plot(x, [e["win_rate"] for e in h], marker="o", label="live vs base (rater's win-rate)")
    acc = [(e["votes"], e["reward_accuracy_on_rater"]) for e in h if e["reward_accuracy_on_rater"] is not None]
    if acc:
        top.plot(*zip(*acc), marker="s", linestyle="--", label="reward model accuracy on the rater's labels")
    top.axhline(0.5, color="grey", linewidth=0.8)
    top.set_ylim(0, 1)
    top.set_ylabel("rate")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"rater {summary['rater']}: {summary['votes']} votes, a round every {summary['round_every']}")
    bottom.plot(x, [e["kl"] for e in h], marker="o", color="tab:red")
    bottom.set_ylabel("KL to base (nats/answer)")
    bottom.set_xlabel("votes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
