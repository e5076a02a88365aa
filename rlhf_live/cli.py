"""The `rlhf-live` command: serve, train, export, import, reward-eval, stats, simulate.

Knows argument parsing and which module does each job; holds no logic of its own.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf_live import config as config_mod
from rlhf_live import flags
from rlhf_live.logs import quiet_libraries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-live", description="A chat app that learns from its users.")
    sub = parser.add_subparsers(dest="command")

    def command(name: str, help_: str, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        flags.add_arguments(p, skip)
        return p

    command("serve", "Start the web app (chat, compare, training dashboard, data).")
    p = command("train", "Run training rounds on the DB's feedback now.")
    p.add_argument("--once", action="store_true", help="one round now; print its metrics as JSON")
    p.add_argument(
        "--watch",
        action="store_true",
        help="a round whenever enough new votes arrive (beside `serve --no-train` on the same data dir)",
    )
    p.add_argument(
        "--follow",
        metavar="URL",
        help="with --watch: train for the app at URL over HTTP (another machine; its --admin-token needed)",
    )
    p = command("export", "Write the collected feedback as a TRL-format .jsonl file.")
    p.add_argument("--format", choices=["preference", "kto", "conversations"], required=True)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p = command("import", "Import preference pairs (TRL or Anthropic HH) as A/B choices, or Open WebUI's ratings.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pairs", help="input .jsonl or .jsonl.gz")
    what.add_argument("--openwebui", help="Open WebUI's feedback export (Admin > Evaluations > Export, .json)")
    p = command("reward-eval", "Fit a reward model on pairs once and report held-out accuracy as JSON.", ("train",))
    p.add_argument("--train", required=True)
    p.add_argument("--test", action="append", required=True, help="repeat for several test files")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p = command("stats", "Counts, versions and last training runs.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = command("simulate", "Drive the live loop with a simulated rater; print its learning curve as JSON.")
    p.add_argument(
        "--rater",
        default="concise",
        help="concise, verbose, polite, structured, cheerful, keyword:WORD, module:function or file.py:function",
    )
    p.add_argument("--votes", type=int, default=200, help="A/B votes to cast")
    p.add_argument("--round-every", type=int, default=40, help="a training round after every K votes")
    p.add_argument("--eval-prompts", type=int, default=48, help="held-out prompts scored after every round")
    p.add_argument("--thumbs", action="store_true", help="the rater also thumbs both answers of each pair")
    p.add_argument("--out", default=None, help="folder for result.json, samples.json and curve.png")
    return parser


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _print_stats(stats: dict) -> None:
    """A screenful for people; --json has everything."""
    print(f"live version: {stats['live_version'] or 'base'}   watermark: {stats['watermark']}")
    print("rows:    " + ", ".join(f"{k} {v}" for k, v in stats["counts"].items()))
    print("thumbs:  " + ", ".join(f"{k} {v}" for k, v in stats["votes"].items()))
    print("choices: " + ", ".join(f"{k} {v}" for k, v in stats["choices"].items()))
    for run in stats["last_runs"]:
        m = run.get("metrics") or {}
        keys = ("version", "reward/accuracy", "ppo/score", "ppo/kl")
        shown = ", ".join(f"{k} {m[k]:.3g}" if isinstance(m[k], float) else f"{k} {m[k]}" for k in keys if k in m)
        print(f"run {run['id']}: {run['kind']} {run['status']} {run['started']}  {shown}{run.get('error') or ''}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m rlhf_live`."""
    args = _parser().parse_args(argv)
    if args.command is None:
        args = _parser().parse_args(["serve", *(argv or [])])
    cfg = flags.from_args(args)
    quiet_libraries()
    try:
        return _run(args, cfg)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Known, user-facing failures print one sentence; anything else keeps its traceback.
        from rlhf_live.learning.remote import FeedError
        from rlhf_live.model.base import ModelNotAvailable
        from rlhf_live.store.recovery import TrainingBusy

        user_errors: tuple[type, ...] = (ModelNotAvailable, FileNotFoundError, ValueError, TrainingBusy, FeedError)
        if isinstance(exc, user_errors):
            print(f"rlhf-live: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    if args.command == "serve":
        from rlhf_live.ui import serve

        serve(cfg)
        return 0
    if args.command == "export":
        from rlhf_live.store import Store

        n = Store.from_config(cfg).export(args.format, args.out)
        print(f"wrote {n} rows to {args.out}")
        return 0
    if args.command == "import":
        from rlhf_live.store import Store

        store = Store.from_config(cfg)
        if args.openwebui:
            _print_json(store.import_openwebui(args.openwebui, ours=(cfg.api_model_name,)))
        else:
            _print_json(store.import_pairs(args.pairs))
        return 0
    if args.command == "stats":
        from rlhf_live.store import Store

        stats = Store.from_config(cfg).stats()
        if args.json:
            _print_json(stats)
        else:
            _print_stats(stats)
        return 0
    if args.command == "reward-eval":
        from rlhf_live.learning.reward.offline import reward_eval

        _print_json(reward_eval(cfg, args.train, args.test, args.limit_train, args.limit_test))
        return 0
    if args.command == "train":
        from rlhf_live.learning.trainer import train_once, watch
        from rlhf_live.runtime import engine_file

        if args.watch and args.follow:
            from rlhf_live.learning.remote import RemoteStore, follow_url, shared_settings
            from rlhf_live.store.recovery import owner

            store = RemoteStore(follow_url(args.follow), cfg.admin_token, cfg.data_dir + "/followed", owner())
            store.state(patience_s=20)  # a wrong URL or token fails now, not after minutes of retries
            watch(shared_settings(cfg, store), store=store)
            return 0
        if args.watch:
            from rlhf_live.store.hub import HubSync

            hub = HubSync(cfg)
            for note in hub.pull():
                print(f"[train] {note}", flush=True)
            watch(cfg, hub=hub, engine_file=engine_file(cfg))
            return 0
        if not args.once:
            print(
                "rlhf-live: say `train --once` (one round now) or `train --watch` (rounds as votes arrive).",
                file=sys.stderr,
            )
            return 2
        _print_json(train_once(cfg, engine_file=engine_file(cfg)))
        return 0
    if args.command == "simulate":
        from rlhf_live.eval.simulate import simulate

        result = simulate(
            cfg,
            args.rater,
            args.votes,
            round_every=args.round_every,
            eval_prompts=args.eval_prompts,
            out=args.out,
            thumbs=args.thumbs,
        )
        print(json.dumps(result, default=str))  # one JSON object, the last thing on stdout
        return 0
    raise AssertionError(args.command)
