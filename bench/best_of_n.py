"""Best of N: would sampling more answers per prompt reach what the model rarely does? (issue 23)

    python bench/best_of_n.py RUN_DIR [RUN_DIR ...] --rater steps --prompts 16 --n 16

For each finished `rlhf-live simulate` data dir (a copy of it: nothing is written to the run): the probe reward model
is fitted on all its votes, as the next round would, and the live version and the base each sample N answers to each
of the run's held-out prompts (never voted on) through the served engine. Per prompt it reads which answers the rater
scores above its lowest score (they show the preference), and which answer the reward model would pick as the best
of N (its score, and the pessimistic score a PPO round optimises). Prints a table: how often one sample shows the
preference, how often any of N does (what exploration could reach), and how often the reward model's pick does (what
a best-of-N learner would be trained towards). Writes bench/best_of_n.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def shows(scores: list[float]) -> list[bool]:
    """Which answers show the preference: scored above the rater's lowest score of all answers measured."""
    return [s > min(scores) for s in scores] if len(set(scores)) > 1 else [False] * len(scores)


def measure(run: Path, rater_spec: str, n_prompts: int, n: int, seed: int, eval_prompts: int) -> list[dict]:
    """Rows (version, one sample, any of N, reward model's pick, pessimistic pick) for the live version and base."""
    from dataclasses import replace

    from rlhf_live.eval.raters import BUILT_IN, keyword_score
    from rlhf_live.eval.simulate import split_prompts
    from rlhf_live.flags import from_env
    from rlhf_live.learning.copies import TrainingCopies
    from rlhf_live.model.lora import BASE
    from rlhf_live.runtime import assemble
    from rlhf_live.serving.settings import GenerationSettings

    score = keyword_score(rater_spec.split(":", 1)[1]) if rater_spec.startswith("keyword:") else BUILT_IN[rater_spec]
    work = Path(tempfile.mkdtemp(prefix="best-of-n-"))
    shutil.copytree(run, work, dirs_exist_ok=True)
    cfg = replace(from_env(), data_dir=str(work), seed=seed, train=False)  # RLHF_LIVE_* apply (engine threads)
    app = assemble(cfg, hub=False, start=False)
    reward_model = TrainingCopies(cfg).new_reward_model()
    store = app.store
    reward_model.fit(store.preference_pairs(), ties=store.ties(), pointwise=store.pointwise_labels())
    held_out, _ = split_prompts(eval_prompts, seed)  # the run's own held-out split: never voted on
    prompts = [p for p in held_out[:n_prompts] for _ in range(n)]  # (P * n,) prompt i's answers at i*n .. i*n+n-1
    settings = GenerationSettings.from_config(cfg, max_new_tokens=cfg.ppo_max_new_tokens)
    rows = []
    for version in dict.fromkeys([app.policy.version, BASE]):
        answers = [""] * len(prompts)
        for j in range(n):  # sample j of every prompt; the engine seeds answer k of a call with seed + k
            draw = app.policy.generate_many(
                held_out[:n_prompts], replace(settings, seed=seed * 100_000 + j * 1_000), versions=[version] * n_prompts
            )
            for i, a in enumerate(draw):
                answers[i * n + j] = a.text
        rated = [float(score(p, a)) for p, a in zip(prompts, answers)]
        good = shows(rated)
        plain = reward_model.score(prompts, answers, normalise=True)  # (P * n,)
        members = reward_model.member_scores(prompts, answers)  # (P * n, K)
        pessimistic = plain - cfg.reward_pessimism * members.std(1) if members is not None else plain
        groups = range(n_prompts)
        pick = lambda s, i: i * n + int(s[i * n : (i + 1) * n].argmax())  # noqa: E731
        rows.append(
            {
                "run": run.name,
                "version": version,
                "answers": len(answers),
                "one_sample": sum(good) / len(good),
                "any_of_n": sum(any(good[i * n : (i + 1) * n]) for i in groups) / n_prompts,
                "rm_pick": sum(good[pick(plain, i)] for i in groups) / n_prompts,
                "pessimistic_pick": sum(good[pick(pessimistic, i)] for i in groups) / n_prompts,
                "examples": [answers[pick(pessimistic, i)] for i in groups][:3],
            }
        )
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="data dirs of finished simulate runs (rlhf_live.db + adapters/)")
    parser.add_argument("--rater", required=True, help="the rater the runs were simulated with")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    parser.add_argument("--n", type=int, default=16, help="answers sampled per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (their held-out split)")
    parser.add_argument("--eval-prompts", type=int, default=48, help="the runs' --eval-prompts (their split)")
    parser.add_argument("--out", default=str(HERE / "best_of_n.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    rows = [
        row
        for run in args.runs
        for row in measure(Path(run), args.rater, args.prompts, args.n, args.seed, args.eval_prompts)
    ]
    print(f"rater {args.rater}, {args.prompts} held-out prompts x {args.n} answers")
    print("| run | version | one sample shows it | any of N | reward model's pick | pessimistic pick |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {r['version']} | {r['one_sample']:.2f} | {r['any_of_n']:.2f} | {r['rm_pick']:.2f} "
            f"| {r['pessimistic_pick']:.2f} |"
        )
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
