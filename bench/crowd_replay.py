"""Crowd replay: the contrarian test re-run on the votes a finished crowd run kept, after every few votes, offline.

    python bench/crowd.py --scenario attack --round-every 0 --keep runs/ -- --train-min-new-votes 100000
    python bench/crowd_replay.py runs/*/ --every 4

A live run tests sources only when a round runs, so how many votes a flag needs depends on how fast rounds come;
the replay tests after every `--every` votes, as rounds that always keep up would, and compares the shipped statistic
(`crowd.evidence` with the Platt-calibrated consensus) with the earlier one (agreements counted against the median
source's agreement rate). Prints per run the votes each source had when first flagged and the largest evidence of
any source never meant to be flagged, and writes bench/crowd_replay.json. Sources are named by the bench's voters
(the salted hashes are matched back to their loopback addresses).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def counts_statistic(mine, others):
    """The 2026-12-07 statistic: agreements counted, against the median source's agreement rate (typical vs mirror)."""
    from rlhf_live.learning import crowd

    rates = sorted(crowd.agreement(p) for p in others.values() if len(p) >= 2)
    median = (rates[len(rates) // 2] + rates[(len(rates) - 1) // 2]) / 2 if rates else 0.5
    typical = min(max(median, 0.5), 0.95)
    log_odds = len(mine) * (1 - 2 * crowd.agreement(mine)) * math.log(typical / (1 - typical))
    return crowd.Evidence(len(mine), crowd.agreement(mine), log_odds)


def replay(data_dir: Path, reward_model, cfg, every: int, names: dict[str, str]) -> dict:
    """Test after every `every` votes: per statistic, who is flagged when; per source, its evidence at each point."""
    from rlhf_live.learning import crowd
    from rlhf_live.learning.round import _weigh
    from rlhf_live.store import Store

    store = Store(data_dir / "rlhf_live.db")
    pairs, ties, thumbs = store.preference_pairs(), store.ties(), store.pointwise_labels()
    last = max((r.seq for rows in (pairs, ties, thumbs) for r in rows), default=0)
    statistics = {"calibrated (shipped)": None, "counts (2026-12-07)": counts_statistic}
    first_flag: dict[str, dict[str, int]] = {k: {} for k in statistics}
    points = []
    for w in range(every, last + 1, every):
        upto = [[r for r in rows if r.seq <= w] for rows in (pairs, ties, thumbs)]
        weighted = _weigh(cfg, frozenset(), *upto)
        reward_model.fit(*weighted[:1], ties=weighted[1], pointwise=weighted[2], progress=lambda _: None)

        @functools.cache  # the table below and both statistics' tests ask for the same leave-out fits
        def held_out(without: frozenset[str], weighted=weighted) -> dict[str, list[float]]:
            return reward_model.held_out_probs(*weighted, min_votes=2, most=64, without=without)

        point = {"votes": w, "sources": {}}
        probs = held_out(frozenset())
        for source, mine in probs.items():
            others = held_out(frozenset({source}))
            beta = crowd.calibration(others)
            point["sources"][names.get(source, source[:8])] = {
                "votes": len(mine),
                "agree": round(crowd.agreement(mine), 3),
                "beta": round(beta, 3),
                "calibrated": round(crowd.evidence(mine, beta).log_odds, 2),
                "counts": round(counts_statistic(mine, others).log_odds, 2),
            }
        for name, statistic in statistics.items():
            test = crowd.trimmed_test(held_out, frozenset(), cfg.flag_min_votes, cfg.flag_odds, statistic)
            for source, ev in test.flagged.items():
                first_flag[name].setdefault(names.get(source, source[:8]), ev.votes)
            point[name] = sorted(names.get(s, s[:8]) for s in test.flagged)
        points.append(point)
        print(f"  {data_dir.name} after {w} votes: " + ", ".join(
            f"{n} {v['votes']}v {v['calibrated']:+.1f}/{v['counts']:+.1f}" for n, v in point["sources"].items()
        ), flush=True)  # fmt: skip
    return {"run": str(data_dir), "votes": last, "first_flagged_at_votes": first_flag, "points": points}


def voter_names(data_dir: Path) -> dict[str, str]:
    """{salted source hash: bench voter name} for the loopback addresses bench/crowd.py uses."""
    from rlhf_live.store import Store, source_id

    salt = Store(data_dir / "rlhf_live.db").voter_salt()
    names = {source_id("127.0.0.2", None, salt): "attacker"}
    names.update({source_id(f"127.0.0.{3 + i}", None, salt): f"honest{i}" for i in range(5)})
    names.update({source_id(f"127.0.0.{10 + j}", None, salt): f"colluder{j}" for j in range(2)})
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="data dirs kept by bench/crowd.py --keep (each holds rlhf_live.db)")
    ap.add_argument("--every", type=int, default=4, help="test after every K votes")
    ap.add_argument("--out", default=str(HERE / "crowd_replay.json"))
    args, extra = ap.parse_known_args()
    sys.path.insert(0, str(ROOT))
    from rlhf_live import flags
    from rlhf_live.learning.copies import TrainingCopies

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    cfg = flags.from_args(parser.parse_known_args([a for a in extra if a != "--"])[0])
    cfg.public = True
    reward_model = TrainingCopies(cfg).new_reward_model()  # one probe: its feature cache serves every run
    results = []
    for run in args.runs:
        data_dir = Path(run)
        out = replay(data_dir, reward_model, cfg, args.every, voter_names(data_dir))
        results.append(out)
        print(f"\n## {data_dir} ({out['votes']} votes): first flagged at (its votes)")
        print("| statistic | flagged (votes when first flagged) | largest evidence of an honest source |")
        print("|---|---|---:|")
        for name, flagged in out["first_flagged_at_votes"].items():
            key = "calibrated" if name.startswith("calibrated") else "counts"
            honest = [v[key] for p in out["points"] for n, v in p["sources"].items() if n.startswith("honest")]
            who = ", ".join(f"{n} ({v})" for n, v in flagged.items()) or "nobody"
            print(f"| {name} | {who} | {max(honest, default=float('nan')):+.1f} |")
    Path(args.out).write_text(json.dumps({"every": args.every, "results": results}, indent=1))


if __name__ == "__main__":
    main()
