"""Before/after a change that should not change speed: the generation and PPO benchmarks from two source trees in
one run, alternated, as ratios.

    python bench/trees.py --before 2725c7a              # this tree vs that commit (checked out in a temp worktree)
    python bench/trees.py --before 2725c7a --rounds 3 --updates 2

Each round runs, from each tree in turn (the order flips every round, so a busy machine hurts both alike):
`bench/generation.py --only <variant> --runs R` (the default served engine: time to first token and decode tok/s)
and `bench/ppo.py --updates U --dtype bfloat16 --base dequantized` (seconds per PPO update). Prints a table of
medians and after/before ratios; writes bench/trees.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_bench(tree: Path, args: list[str], out: Path) -> dict:
    """One benchmark script of `tree`, run with that tree's package first on the path; its JSON."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(tree / "bench" / args[0]), *args[1:], "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def measure(tree: Path, a: argparse.Namespace, work: Path) -> dict:
    """Decode tok/s and time to first token of the served variant, seconds per PPO update."""
    gen = run_bench(
        tree, ["generation.py", "--only", a.variant, "--runs", str(a.runs), "--concurrent", "0"], work / "g.json"
    )
    row = gen["rows"][0]
    ppo_args = ["ppo.py", "--updates", str(a.updates), "--dtype", "bfloat16", "--base", "dequantized"]
    ppo = run_bench(tree, [*ppo_args, "--threads", str(os.cpu_count())], work / "p.json")
    return {
        "decode_tok_s": row["decode_tok_s"],
        "ttft_s": row["ttft_s"],
        "ppo_update_s": ppo["results"][0]["median"]["seconds_total"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="a git revision of this repository")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="generation runs per measurement")
    ap.add_argument("--updates", type=int, default=2, help="PPO updates per measurement")
    ap.add_argument("--variant", default="merged, q8_0", help="generation.py --only: the served engine's row")
    ap.add_argument("--out", default=str(HERE / "trees.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlhf-live-trees-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), a.before], cwd=ROOT, check=True)
        try:
            trees = {"before": before, "after": ROOT}
            results: dict[str, list[dict]] = {"before": [], "after": []}
            for k in range(a.rounds):
                for name in ("before", "after") if k % 2 == 0 else ("after", "before"):
                    results[name].append(measure(trees[name], a, Path(tmp)))
                    print(f"round {k + 1}, {name}: {results[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    keys = ("decode_tok_s", "ttft_s", "ppo_update_s")
    med = {n: {k: statistics.median(r[k] for r in rs) for k in keys} for n, rs in results.items()}
    print(
        f"\n| measure ({a.rounds} rounds, medians) | before {a.before} | after | after / before |\n|---|---:|---:|---:|"
    )
    for k in keys:
        print(f"| {k} | {med['before'][k]:.3f} | {med['after'][k]:.3f} | {med['after'][k] / med['before'][k]:.2f}x |")
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
