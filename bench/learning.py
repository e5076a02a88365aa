"""Learning benchmark: the live loop with each built-in simulated rater; win-rate vs base, KL, fluency, minutes.

    python bench/learning.py                                  # every built-in rater, 200 votes, a round every 40
    python bench/learning.py --raters concise,structured --votes 120 --jobs 2
    python bench/learning.py --learners ppo,dpo,kto --votes 100 --round-every 20 --out bench/learners

Each rater runs `rlhf-live simulate` in its own process and data dir (the same seed, prompts and settings for all),
so `--jobs 2` runs two at once (one thread each for torch and the engine; times are then not the single-run
times the 30-minute goal is about). Prints a table; writes bench/learning.json and
bench/learning/<rater>/{result.json,samples.json,curve.png}. Extra arguments after `--` go to every simulate run
(e.g. `-- --ppo-lr 3e-4`). With `--learners`, every rater runs once per learner (same seed, prompts and votes
schedule) into OUT/<learner>/<rater>/, and OUT/learners.png has one panel per rater with a curve per learner.
`--resume` reuses the result of every run that finished before (same OUT) and runs only the rest. `--seeds 0,1,2`
runs every rater once per seed into OUT/.../<rater>/seed<k>/ and prints each rater's worst and mean seed (issue 23:
the worst of three seeds is the reliability a person demoing it can count on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATERS = "concise,verbose,polite,structured,cheerful,keyword:example,clarifying,steps"


def run_one(rater: str, learner: str | None, seed: int, args: argparse.Namespace, extra: list[str]) -> dict:
    """One simulate run in a fresh data dir; its summary (or the error)."""
    name = rater.replace(":", "_") if learner is None else f"{learner}/{rater.replace(':', '_')}"
    name += f"/seed{seed}" if args.seeds else ""
    out = Path(args.out) / name
    data = Path(args.work) / name
    if args.resume and (out / "result.json").exists():
        return json.loads((out / "result.json").read_text())
    subprocess.run(["rm", "-rf", str(data)], check=True)
    cmd = [sys.executable, "-m", "rlhf_live", "simulate", "--rater", rater, "--votes", str(args.votes)]
    cmd += ["--round-every", str(args.round_every), "--eval-prompts", str(args.eval_prompts)]
    cmd += ["--seed", str(seed), "--data-dir", str(data), "--out", str(out), *extra]
    cmd += ["--learner", learner] if learner else []
    env = dict(os.environ)
    if args.jobs > 1:
        # One thread each for torch and the llama.cpp engine: with the engine on all cores, two runs at once spun
        # against each other and 20 votes took 357-528 s instead of ~27 s alone (RESULTS.md, 2026-12-08).
        env["OMP_NUM_THREADS"] = "1"
        env["RLHF_LIVE_ENGINE_THREADS"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    if proc.returncode != 0:
        error = f"exit {proc.returncode}; see {out / 'log.txt'}"
        return {"rater": rater, "learner": learner or "ppo", "seed": seed, "error": error, "seconds": time.time() - t0}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seed": seed}


def gain_per_nat(r: dict) -> float:
    """Win-rate gained per nat of KL to the base: the last evaluation over the first (the base against itself)."""
    # Where the KL budget went (issue 23): a run that spends the gate's 20 nats on drift the rater does not reward
    # shows a small number here even when its win-rate ends high.
    start = r["history"][0]["win_rate"] if r.get("history") else 0.5
    return (r["win_rate"] - start) / r["kl"] if r["kl"] > 0 else float("nan")


def base_ties(r: dict) -> str:
    """How rare the rater's preference is in the base: the held-out base-vs-base pairs it could not tell apart."""
    # A pair the rater ties teaches nothing; where the base almost never shows the preference, almost every vote ties.
    ties, n = r["history"][0]["ties"], r.get("eval_prompts")  # runs before 2026-12-08 did not record n
    return f"{ties}/{n}" if n else str(ties)


def refused(r: dict) -> str:
    """Rounds the gate refused (or that failed) of all rounds."""
    return f"{sum(e['status'] != 'live' for e in r['history'][1:])}/{len(r['history']) - 1}"


def table(results: list[dict]) -> str:
    head = (
        "| rater | learner | seed | base ties | informative votes | win-rate vs base [95%] | KL | gain per nat "
        "| refused | words (base) | EOS rate (base) | distinct-2 (base) | fluent | minutes |\n"
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['rater']} | {r['learner']} | {r.get('seed', '')} | error: {r['error']} ||||||||||")
            continue
        b, (lo, hi) = r["base"], r["win_rate_ci"]
        rows.append(
            f"| {r['rater']} | {r.get('learner', 'ppo')} | {r.get('seed', '')} | {base_ties(r)} "
            f"| {r['informative_votes']}/{r['votes']} | {r['win_rate']:.2f} [{lo:.2f}, {hi:.2f}] "
            f"| {r['kl']:.1f} | {gain_per_nat(r):+.3f} | {refused(r)} "
            f"| {r['answer_words']:.0f} ({b['answer_words']:.0f}) | {r['eos_rate']:.2f} "
            f"({b['eos_rate']:.2f}) | {r['distinct2']:.2f} ({b['distinct2']:.2f}) | {r['fluent']} "
            f"| {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(rows)


def by_seed(results: list[dict]) -> str:
    """Per rater and learner over its seeds: the worst win-rate, the mean and every seed's."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["rater"], r.get("learner", "ppo")), []).append(r["win_rate"])
    return "\n".join(
        f"{rater} ({learner}): worst seed {min(w):.2f}, mean {sum(w) / len(w):.2f}, "
        f"seeds {', '.join(f'{x:.2f}' for x in w)}"
        for (rater, learner), w in groups.items()
    )


def plot(results: list[dict], path: Path) -> None:
    """One panel per rater: win-rate vs base against votes, a curve per learner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raters = list(dict.fromkeys(r["rater"] for r in results))
    fig, axes = plt.subplots(1, len(raters), figsize=(4 * len(raters), 3.4), squeeze=False, sharey=True)
    for ax, rater in zip(axes[0], raters):
        for r in (r for r in results if r["rater"] == rater and "history" in r):
            votes = [e["votes"] for e in r["history"]]
            ax.plot(votes, [e["win_rate"] for e in r["history"]], marker="o", label=r.get("learner", "ppo"))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=rater, xlabel="votes", ylim=(0, 1))
    axes[0][0].set_ylabel("win-rate vs base")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raters", default=RATERS)
    parser.add_argument("--votes", type=int, default=200)
    parser.add_argument("--round-every", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2: every run once per seed (instead of --seed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each with one thread when > 1)")
    parser.add_argument("--learners", default="", help="e.g. ppo,dpo,kto: every rater once per learner")
    parser.add_argument("--out", default=str(HERE / "learning"))
    parser.add_argument("--resume", action="store_true", help="reuse OUT/.../result.json where a run finished")
    parser.add_argument("--work", default="/tmp/rlhf-live-bench-learning", help="data dirs of the runs")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    raters = [r for r in args.raters.split(",") if r]
    learners = [x for x in args.learners.split(",") if x] or [None]
    seeds = [int(x) for x in args.seeds.split(",") if x] or [args.seed]
    runs = [(r, x, seed) for r in raters for x in learners for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda run: run_one(*run, args, extra), runs))
    print(table(results))
    if len(seeds) > 1:
        print("\n" + by_seed(results))
    summary = {"args": vars(args), "extra": extra, "results": results}
    name = "learners" if args.learners else "learning"
    (HERE / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.learners:
        plot(results, Path(args.out) / "learners.png")


if __name__ == "__main__":
    main()
