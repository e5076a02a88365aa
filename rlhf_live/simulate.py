"""A simulated rater with a hidden preference rule, voting through the same Service as people do.

Knows a few built-in rules (or any `module:function` taking (prompt, answer_a, answer_b) -> 'A'|'B'|'tie') and how
to drive compare -> choose -> train -> compare again; knows nothing of Gradio or SQL.
"""

from __future__ import annotations

import importlib
import random
import time
from collections.abc import Callable

from .config import Config
from .policy import BASE, GenerationSettings, Policy
from .ppo import load_seed_prompts
from .service import Service
from .store import Store

Rater = Callable[[list[dict], str, str], str]


def concise(prompt: list[dict], a: str, b: str) -> str:
    """Prefers the shorter answer (by words); equal length is a tie."""
    la, lb = len(a.split()), len(b.split())
    return "A" if la < lb else "B" if lb < la else "tie"


def verbose(prompt: list[dict], a: str, b: str) -> str:
    """Prefers the longer answer (by words)."""
    return {"A": "B", "B": "A", "tie": "tie"}[concise(prompt, a, b)]


def polite(prompt: list[dict], a: str, b: str) -> str:
    """Prefers answers that say please / thank you / glad; otherwise the shorter one."""
    words = ("please", "thank", "glad", "happy to")
    pa, pb = (sum(w in t.lower() for w in words) for t in (a, b))
    return "A" if pa > pb else "B" if pb > pa else concise(prompt, a, b)


RATERS: dict[str, Rater] = {"concise": concise, "verbose": verbose, "polite": polite}


def load_rater(name: str) -> Rater:
    """A built-in rater by name, or `module:function`."""
    if name in RATERS:
        return RATERS[name]
    if ":" in name:
        module, func = name.split(":", 1)
        return getattr(importlib.import_module(module), func)
    raise ValueError(f"Unknown rater {name!r}: use one of {', '.join(RATERS)} or module:function.")


def _win_rate(service: Service, rater: Rater, prompts, versions: list[str], settings) -> float:
    """How often the rater prefers versions[0]'s answer over versions[1]'s (ties count half)."""
    wins = 0.0
    for prompt in prompts:
        a, b = service.policy.generate(prompt, settings, n=2, versions=versions)
        wins += {"A": 1.0, "B": 0.0, "tie": 0.5}[rater(prompt, a.text, b.text)]
    return wins / max(1, len(prompts))


def simulate(cfg: Config, rater_name: str, votes: int, *, train: bool = True, eval_prompts: int = 16) -> dict:
    """Cast `votes` A/B votes with the rater, train one round, and measure the rater's win-rate of new vs base."""
    from .trainer import run_round  # heavy: only when simulating

    rater = load_rater(rater_name)
    rng = random.Random(cfg.seed)
    store = Store.from_config(cfg)
    policy = Policy.from_config(cfg)
    service = Service(policy, store, cfg)
    voter = service.voter(f"simulated:{rater_name}")
    prompts = load_seed_prompts()
    rng.shuffle(prompts)
    held_out, train_prompts = prompts[:eval_prompts], prompts[eval_prompts:]
    settings = GenerationSettings.from_config(cfg, max_new_tokens=cfg.ppo_max_new_tokens)
    start = time.perf_counter()
    choices = {"A": 0, "B": 0, "tie": 0}
    for i in range(votes):
        prompt = train_prompts[i % len(train_prompts)]
        *_, pair = service.compare(voter, prompt[-1]["content"], settings=settings)
        choice = rater(prompt, pair["a"]["text"], pair["b"]["text"])
        service.choose(voter, pair["pair_id"], choice, reason=f"simulated rater {rater_name}")
        choices[choice] += 1
    result: dict = {
        "rater": rater_name,
        "votes": votes,
        "choices": choices,
        "seconds_voting": time.perf_counter() - start,
    }
    if not train:
        return result
    metrics = run_round(cfg, store)
    policy.swap(store.adapter(metrics["version"])["path"], metrics["version"])
    result["version"] = metrics["version"]
    result["reward_accuracy"] = metrics.get("reward/accuracy")
    result["ppo_score_first"], result["ppo_score_last"] = metrics.get("ppo/score_first"), metrics.get("ppo/score_last")
    result["ppo_kl"] = metrics.get("ppo/kl")
    result["win_rate_new_vs_base"] = _win_rate(service, rater, held_out, [metrics["version"], BASE], settings)
    result["seconds_total"] = time.perf_counter() - start
    return result
