"""Benchmark of the feedback store: sustained votes/s from 8 threads, and import/export time for 100k pairs.

Run: python bench/store.py [--seconds 5] [--rows 100000] [--threads 8]; prints a table and writes bench/store.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from rlhf_live.store import Store


def bench_votes(folder: Path, synchronous: str, threads: int, seconds: float) -> dict:
    """Every thread votes on random answers through its own connection for `seconds`; count acknowledged votes."""
    store = Store(folder / f"votes-{synchronous}.db", synchronous=synchronous)
    cid = store.new_conversation("bench")
    user = store.add_message(cid, "user", "Which answer is better?")
    answers = [store.add_message(cid, "assistant", f"answer {i}", parent_id=user) for i in range(200)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    stop = time.perf_counter() + seconds + 0.5  # placeholder; reset after the barrier

    def run(k: int) -> None:
        rng = random.Random(k)
        store.db()  # open this thread's connection before the clock starts
        start.wait()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            store.record_feedback(rng.choice(answers), f"voter-{k}-{rng.randrange(50)}", rng.choice(["up", "down"]))
            latencies[k].append(time.perf_counter() - t0)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    stop = time.perf_counter() + seconds
    begin = time.perf_counter()
    start.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - begin
    flat = sorted(x for lat in latencies for x in lat)
    ok = store.db().conn.execute("PRAGMA integrity_check").fetchone()[0]
    events = store.db().conn.execute("SELECT count(*) FROM feedback_events").fetchone()[0]
    store.close()
    return {
        "synchronous": synchronous,
        "threads": threads,
        "seconds": round(elapsed, 2),
        "votes": len(flat),
        "votes_per_s": round(len(flat) / elapsed, 1),
        "p50_ms": round(statistics.median(flat) * 1000, 2),
        "p99_ms": round(flat[int(len(flat) * 0.99) - 1] * 1000, 2),
        "all_acknowledged_stored": events == len(flat),
        "integrity_check": ok,
    }


def bench_export(folder: Path, rows: int) -> dict:
    """Import `rows` TRL pairs (two-turn prompts, ~100-300 chars per answer), then time each export format."""
    rng = random.Random(0)
    words = "the a model answer good bad helpful short long clear vague because therefore however".split()  # noqa: SIM905

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    src = folder / "pairs.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(rows):
            prompt = [
                {"role": "user", "content": f"Question {i}: {text(12)}?"},
                {"role": "assistant", "content": text(20)},
                {"role": "user", "content": text(10) + "?"},
            ]
            fh.write(json.dumps({"prompt": prompt, "chosen": text(rng.randint(15, 45)), "rejected": text(25)}) + "\n")
    store = Store(folder / "export.db")
    t0 = time.perf_counter()
    report = store.import_pairs(src)
    result = {"rows": rows, "imported": report["imported"], "import_s": round(time.perf_counter() - t0, 2)}
    for fmt in ("preference", "kto", "conversations"):
        out = folder / f"{fmt}.jsonl"
        t0 = time.perf_counter()
        n = store.export(fmt, out)
        result[f"export_{fmt}_s"] = round(time.perf_counter() - t0, 2)
        result[f"export_{fmt}_rows"] = n
        result[f"export_{fmt}_mb"] = round(out.stat().st_size / 1e6, 1)
    t0 = time.perf_counter()
    result["preference_pairs_rows"] = len(store.preference_pairs(0))
    result["preference_pairs_s"] = round(time.perf_counter() - t0, 2)
    result["db_mb"] = round((folder / "export.db").stat().st_size / 1e6, 1)
    store.close()
    return result


def main() -> None:
    """Run both benchmarks, print a table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("store.json")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        votes = [bench_votes(folder, sync, args.threads, args.seconds) for sync in ("FULL", "NORMAL")]
        export = bench_export(folder, args.rows)
    print(f"{'synchronous':<12}{'threads':>8}{'votes':>8}{'votes/s':>10}{'p50 ms':>9}{'p99 ms':>9}  all stored")
    for v in votes:
        print(
            f"{v['synchronous']:<12}{v['threads']:>8}{v['votes']:>8}{v['votes_per_s']:>10}"
            f"{v['p50_ms']:>9}{v['p99_ms']:>9}  {v['all_acknowledged_stored']} ({v['integrity_check']})"
        )
    print()
    print(f"import {export['imported']} pairs: {export['import_s']} s   (DB {export['db_mb']} MB)")
    for fmt in ("preference", "kto", "conversations"):
        print(
            f"export {fmt:<14} {export[f'export_{fmt}_rows']:>7} rows  {export[f'export_{fmt}_s']:>6} s"
            f"  {export[f'export_{fmt}_mb']:>6} MB"
        )
    print(f"preference_pairs(0): {export['preference_pairs_rows']} rows in {export['preference_pairs_s']} s")
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, python {platform.python_version()}",
        "votes": votes,
        "export": export,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
