"""Crowd: simulated strangers vote on a running `python app.py --public` over HTTP, as browsers do, each honest one
from its own loopback address; attackers open a fresh session per vote, spoof forwarding headers and vote the
opposite of the honest preference. What they achieve: versions live, their share of each round, when they are flagged.

    python bench/crowd.py --scenario alone           # one source, 100 votes: nothing goes live, refusals
    python bench/crowd.py --scenario attack --seeds 1   # 5 honest sources (40 votes) + 1 attacker (40), and honest only
    python bench/crowd.py --scenario collude          # two attackers on two addresses; one on ten addresses
    python bench/crowd.py --scenario flips            # honest voters with 20% of their votes flipped: false flags
    python bench/crowd.py --scenario attack -- --ppo-updates-per-round 4   # app flags after --

Prints a table and writes bench/crowd.json. Loopback only (127.0.0.2-127.0.0.30 are all this machine).
`queue_call` is also what tests/system/test_crowd.py drives the app with.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPOOF = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7", "Forwarded": "for=203.0.113.7"}
"""What an attacker sends to look like someone else; without a trusted proxy none of it may be believed."""


def app_config(url: str) -> dict:
    with urllib.request.urlopen(urllib.parse.urljoin(url, "config"), timeout=30) as resp:
        return json.loads(resp.read())


def queue_call(
    url: str, api_name: str, data: list, *, session: str, address: str, headers=None, config=None
) -> tuple[bool, object]:
    """One call through Gradio's queue protocol from a loopback `address`: (True, result) or (False, the error)."""
    config = config or app_config(url)
    fn = next(d.get("id", i) for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    parts = urllib.parse.urlsplit(url)

    def request(method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300, source_address=(address, 0))
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        return conn.getresponse()

    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": None, "trigger_id": None}
    joined = request("POST", "/gradio_api/queue/join", json.dumps(body).encode())
    if joined.status != 200:
        return False, f"HTTP {joined.status}"
    for raw in request("GET", f"/gradio_api/queue/data?session_hash={session}"):
        line = raw.decode().strip()
        if line.startswith("data:"):
            msg = json.loads(line[5:])
            if msg.get("msg") == "process_completed":
                if not msg.get("success"):
                    return False, (msg.get("output") or {}).get("error") or "refused"
                return True, msg["output"]["data"][0]
    return False, "the queue stream ended without a result"


class Voter:
    """One simulated person: an address, a rater, whether it votes against the rater, and its session habits."""

    def __init__(self, name: str, address: str, rater, *, contrary=False, fresh=False, flip=0.0, seed=0):
        self.name, self.address, self.rater = name, address, rater
        self.contrary, self.fresh, self.flip = contrary, fresh, flip
        self.session, self.rng = uuid.uuid4().hex, random.Random(seed)
        self.cast, self.refused, self.errors = 0, 0, []

    def vote(self, url: str, config: dict, prompt: str) -> None:
        """Compare, judge, choose: one A/B vote (or one refusal)."""
        session = uuid.uuid4().hex if self.fresh else self.session
        headers = SPOOF if self.contrary else None
        ok, pair = queue_call(url, "compare", [prompt, ""], session=session, address=self.address, headers=headers,
                              config=config)  # fmt: skip
        if ok:
            a, b = (pair[k]["text"] if isinstance(pair[k], dict) else pair[k] for k in ("a", "b"))
            choice = self.rater([{"role": "user", "content": prompt}], a, b)
            if choice in ("A", "B") and (self.contrary or self.rng.random() < self.flip):
                choice = "B" if choice == "A" else "A"
            ok, pair = queue_call(url, "choose", [pair["pair_id"], choice, ""], session=session,
                                  address=self.address, headers=headers, config=config)  # fmt: skip
        if ok:
            self.cast += 1
        else:
            self.refused += 1
            self.errors.append(str(pair))


def _db(data_dir: Path, sql: str, params: tuple = ()) -> list[dict]:
    conn = sqlite3.connect(f"file:{data_dir / 'rlhf_live.db'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def _wait_idle(data_dir: Path, timeout: float = 1800) -> None:
    """Until no round is running and none is due to start (the trainer checks every few seconds)."""
    deadline, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and quiet < 3:
        running = _db(data_dir, "SELECT count(*) AS n FROM training_runs WHERE status = 'running'")[0]["n"]
        quiet = 0 if running else quiet + 1
        time.sleep(4)


def _wait_round(data_dir: Path, finished: int, start_within: float = 90, timeout: float = 1800) -> int:
    """Until a round after the first `finished` ones has finished (or none started within `start_within` s)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        runs = _db(data_dir, "SELECT status FROM training_runs WHERE kind = 'round'")
        done = sum(r["status"] != "running" for r in runs)
        if done > finished:
            return done
        if len(runs) == finished and time.monotonic() - t0 > start_within:
            return done
        time.sleep(3)
    return finished


def start_app(data_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "app.py"), "--public", "--data-dir", str(data_dir), "--port", str(port), *extra]
    log = open(data_dir.parent / f"app-{port}.log", "wb")  # noqa: SIM115 (lives as long as the app)
    env = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    raise RuntimeError("the app did not start within 15 min")


def run(
    voters: list[Voter],
    plan: list[int],
    prompts: list[str],
    extra: list[str],
    port: int,
    evaluate=None,
    round_every: int = 0,
    keep: str | None = None,
) -> dict:
    """Start the app, let voters[i] vote in the order `plan` gives, wait for training; what the DB says, and
    `evaluate(adapter_path)` of the version live at the end (after the app stopped)."""
    with tempfile.TemporaryDirectory(prefix="rlhf-crowd-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        proc = start_app(data_dir, port, extra)
        url = f"http://127.0.0.1:{port}/"
        try:
            config = app_config(url)
            finished = 0
            for k, i in enumerate(plan):
                voters[i].vote(url, config, prompts[k % len(prompts)])
                if round_every and (k + 1) % round_every == 0:  # rounds keep up with the votes, as on a quiet Space
                    finished = _wait_round(data_dir, finished)
            _wait_idle(data_dir)
            outcome = _outcome(data_dir, voters)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if keep:
            shutil.copytree(data_dir, Path(keep) / f"{port}-{int(time.time())}", dirs_exist_ok=True)
        if evaluate is not None:
            outcome["win_rate_vs_base"] = evaluate(outcome.pop("live_path"))
        outcome.pop("live_path", None)
        return outcome


def _outcome(data_dir: Path, voters: list[Voter]) -> dict:
    """Per round: status, sources, the largest share; per voter: votes cast, refused, flagged and after how many."""
    from rlhf_live.store import Store, source_id

    salt = Store(data_dir / "rlhf_live.db").voter_salt()
    runs = _db(data_dir, "SELECT status, error, metrics FROM training_runs WHERE kind = 'round' ORDER BY id")
    rounds = []
    for r in runs:
        m = json.loads(r["metrics"] or "{}")
        rounds.append(
            {
                "status": r["status"],
                "error": r["error"][:160],
                "version": m.get("version"),
                "sources": m.get("crowd/reward_sources"),
                "largest_share": m.get("crowd/reward_largest_share"),
                "flagged": m.get("crowd/flagged"),
                "tested": m.get("crowd/tested"),
                "max_log_odds": m.get("crowd/max_log_odds"),
            }
        )
    flags = {r["source"]: r for r in _db(data_dir, "SELECT * FROM sources")}
    people = []
    for v in voters:
        src = source_id(v.address, None, salt)
        flag = flags.get(src)
        before = None
        if flag and flag["status"] == "flagged":  # its votes up to the round that flagged it
            before = _db(
                data_dir,
                "SELECT (SELECT count(*) FROM comparisons WHERE source = ? AND choice IS NOT NULL AND seq <= ?) AS n",
                (src, flag["at_vote"]),
            )[0]["n"]
        people.append(
            {
                "voter": v.name,
                "contrary": v.contrary,
                "cast": v.cast,
                "refused": v.refused,
                "refusal": v.errors[0][:120] if v.errors else "",
                "flagged": bool(flag and flag["status"] == "flagged"),
                "flagged_after_votes": before,
                "log_odds": flag["log_odds"] if flag else None,
            }
        )
    live = _db(data_dir, "SELECT version, path FROM adapters WHERE status = 'live'")
    return {
        "rounds": rounds,
        "voters": people,
        "live": live[0]["version"] if live else "base",
        "live_path": live[0]["path"] if live else None,
    }


def evaluator(extra: list[str], rater, n_eval: int, seed: int):
    """evaluate(adapter_path): the rater's win-rate of that version vs the base on held-out prompts (this process)."""
    from rlhf_live import flags
    from rlhf_live.eval.evaluation import Evaluator
    from rlhf_live.eval.simulate import split_prompts
    from rlhf_live.model.lora import BASE
    from rlhf_live.serving.policy import Policy
    from rlhf_live.serving.settings import GenerationSettings

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser)
    cfg = flags.from_args(parser.parse_known_args(extra)[0])
    held_out, _ = split_prompts(n_eval, seed)
    policy = Policy.from_config(cfg)
    settings = GenerationSettings.from_config(cfg, max_new_tokens=cfg.ppo_max_new_tokens, seed=seed)
    judge = Evaluator(policy, rater, held_out, settings, seed=seed)

    def evaluate(path: str | None) -> dict:
        policy.swap(path, "final" if path else BASE)
        r = judge.evaluate()
        return {"win_rate": r["win_rate"], "ci": r["win_rate_ci"], "n": len(held_out)}

    return evaluate


def scenario_cells(scenario: str, rater, seed: int) -> dict:
    """{cell name: make() -> (voters, plan)}: plan[k] is the index of the voter casting the k-th vote."""

    def honest(flip: float = 0.0) -> list[Voter]:
        return [Voter(f"honest{i}", f"127.0.0.{3 + i}", rater, flip=flip, seed=seed * 100 + i) for i in range(5)]

    def attackers(name: str, first: int, n: int) -> list[Voter]:
        return [Voter(f"{name}{j}", f"127.0.0.{first + j}", rater, contrary=True, fresh=True) for j in range(n)]

    def mixed(n_attackers: int) -> list[int]:  # one attacker vote, then one honest vote, 40 times
        return [j for k in range(40) for j in (5 + k % n_attackers, k % 5)]

    if scenario == "alone":
        return {"alone": lambda: (attackers("alone", 2, 1), [0] * 100)}
    if scenario == "attack":
        return {
            "attack": lambda: ([*honest(), *attackers("attacker", 2, 1)], mixed(1)),
            "honest only": lambda: (honest(), [k % 5 for k in range(40)]),
        }
    if scenario == "collude":
        return {
            "two colluders": lambda: ([*honest(), *attackers("colluder", 10, 2)], mixed(2)),
            "ten addresses, 4 votes each": lambda: ([*honest(), *attackers("sybil", 12, 10)], mixed(10)),
        }
    return {"20% flipped": lambda: (honest(flip=0.2), [k % 5 for k in range(80)])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["alone", "attack", "collude", "flips"], required=True)
    ap.add_argument("--rater", default="concise", help="the honest preference (a built-in rater)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--round-every", type=int, default=16, help="wait for a round after every K votes (0: never)")
    ap.add_argument("--eval-prompts", type=int, default=0, help="held-out prompts for the win-rate (0: none)")
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--cells", nargs="*", default=None, help="only these cells of the scenario")
    ap.add_argument("--keep", default=None, help="copy each cell's data dir under this folder")
    ap.add_argument("--out", default=str(HERE / "crowd.json"))
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    sys.path.insert(0, str(ROOT))
    from rlhf_live.eval.raters import load_rater
    from rlhf_live.eval.simulate import split_prompts

    rater = load_rater(args.rater)
    extra = ["--max-new-tokens", "48", "--train-min-new-votes", "8", "--train-check-s", "5", *extra]
    results = []
    for seed in range(args.seeds):
        _, prompts = split_prompts(max(1, args.eval_prompts), seed)  # never vote on the held-out prompts
        prompts = [p[-1]["content"] for p in prompts]
        random.Random(seed).shuffle(prompts)
        cells = scenario_cells(args.scenario, rater, seed)
        evaluate = evaluator(extra, rater, args.eval_prompts, seed) if args.eval_prompts else None
        for name, make in cells.items():
            if args.cells and name not in args.cells:
                continue
            voters, plan = make()  # fresh voters for every cell: nothing carries over
            t0 = time.perf_counter()
            outcome = run(voters, plan, prompts, extra, args.port, evaluate, args.round_every, args.keep)
            outcome.update({"cell": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)})
            results.append(outcome)
            _print(outcome)
    Path(args.out).write_text(json.dumps({"scenario": args.scenario, "results": results}, indent=1))


def _print(o: dict) -> None:
    win = o.get("win_rate_vs_base")
    won = f"; {win['win_rate']:.2f} [{win['ci'][0]:.2f}, {win['ci'][1]:.2f}] win-rate vs base" if win else ""
    print(f"\n## {o['cell']} (seed {o['seed']}, {o['seconds']} s): live {o['live']}{won}")
    print("| round | status | version | sources | largest share | tested | flagged | most log odds | error |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for i, r in enumerate(o["rounds"], 1):
        share = "–" if r["largest_share"] is None else f"{r['largest_share']:.2f}"
        most = "–" if r["max_log_odds"] is None else f"{r['max_log_odds']:+.1f}"
        cells = (r["status"], r["version"], r["sources"], share, r["tested"], r["flagged"], most, r["error"])
        print(f"| {i} | " + " | ".join(str(c) for c in cells) + " |")
    print(
        "| voter | contrary | cast | refused | flagged (after votes) | log odds | refusal |\n"
        "|---|---|---:|---:|---|---:|---|"
    )
    for v in o["voters"]:
        lo = "–" if v["log_odds"] is None else f"{v['log_odds']:+.1f}"
        flag = f"yes ({v['flagged_after_votes']})" if v["flagged"] else "no"
        print(f"| {v['voter']} | {v['contrary']} | {v['cast']} | {v['refused']} | {flag} | {lo} | {v['refusal']} |")


if __name__ == "__main__":
    main()
