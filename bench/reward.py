"""Reward-model quality and speed on real preference data, against TRL's RewardTrainer on the same base and data.

    python bench/reward.py [--sizes 100,500] [--trl-sizes 500] [--odin-sizes 500] [--test-limit 354]
                           [--oasst-limit 100]

Train on the first N pairs of Anthropic HH helpful-base-test (2,354 pairs), test on its last 354 (disjoint) and
on OpenAssistant pairs. Both trainers: one epoch, the same pairs, batch size, learning rate + schedule, LoRA
modules and max length, the same base weights (NF4 values, dequantized to bf16 on CPU for both: see
rlhf_live/learning/reward/), and the same test scoring code. Prints a table, writes bench/reward.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlhf_live.config import Config
from rlhf_live.learning.reward.lora import RewardModel, _lora_config
from rlhf_live.learning.reward.offline import _length_accuracy, accuracy_by_length, length_baselines
from rlhf_live.model.base import dequantize_cpu_4bit, resolve
from rlhf_live.store.formats import read_pairs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HH = DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"
OASST = DATA / "oasst" / "en_100_tree.jsonl"


def score_ours(rm: RewardModel, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [p.prompt for p in pairs]
    r = rm.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], batch_size=8)
    return r[: len(pairs)], r[len(pairs) :]


def score_seqcls(model, rm: RewardModel, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's model scored on exactly our token ids (same template, same left truncation), length-sorted batches."""
    seqs = [rm.encode(p.prompt, p.chosen)[0] for p in pairs] + [rm.encode(p.prompt, p.rejected)[0] for p in pairs]
    out = torch.empty(len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pad = rm.tokenizer.pad_token_id
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), 8):
            idx = order[s : s + 8]
            t = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), t), pad)
            mask = torch.zeros((len(idx), t), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, : len(seqs[i])], mask[j, : len(seqs[i])] = torch.tensor(seqs[i]), 1
            out[idx] = model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
    return out[: len(pairs)], out[len(pairs) :]


def run_ours(cfg: Config, train, tests: dict) -> dict:
    t0 = time.time()
    rm = RewardModel.create(cfg)
    load = time.time() - t0
    fit = rm.fit(train, eval_fraction=0.0)  # same data and steps as TRL: no held-out part of the train pairs
    name = "rlhf_live + ODIN" if cfg.reward_length_head else "rlhf_live"
    row = {"trainer": name, "n_train": len(train), "load_s": round(load, 1), "train_s": fit["seconds"]}
    row.update(steps=fit["steps"], train_loss=fit["train_loss"], n_prompt_truncated=fit["n_prompt_truncated"])
    for name, pairs in tests.items():
        t = time.time()
        row[name] = accuracy_by_length(*score_ours(rm, pairs), pairs)
        row[name]["score_s"] = round(time.time() - t, 1)
    return row, rm


def run_trl(cfg: Config, train, tests: dict, rm: RewardModel) -> dict:
    """TRL RewardTrainer with AutoModelForSequenceClassification on the same weights, LoRA and schedule."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    from trl import RewardConfig, RewardTrainer

    t0 = time.time()
    source = resolve(cfg.model, cfg.cache_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, quantization_config=quant, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    dequantize_cpu_4bit(model)
    lora = _lora_config(cfg, model)
    lora.task_type, lora.modules_to_save = "SEQ_CLS", ["score"]  # TRL's advice: train the new head too
    ds = Dataset.from_list(
        [
            {
                "prompt": p.prompt,
                "chosen": [{"role": "assistant", "content": p.chosen}],
                "rejected": [{"role": "assistant", "content": p.rejected}],
            }
            for p in train
        ]
    )
    steps = math.ceil(len(train) / cfg.reward_batch_size)
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out,
            per_device_train_batch_size=cfg.reward_batch_size,
            num_train_epochs=1,
            learning_rate=cfg.reward_lr,
            lr_scheduler_type="linear",
            warmup_steps=max(1, round(0.1 * steps)),
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_length=cfg.reward_max_tokens,
            gradient_checkpointing=False,  # TRL's default is True: slower; off for a like-for-like speed test
            bf16=False,  # the base is bf16 already; LoRA/head stay fp32 as in ours
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            logging_steps=max(1, steps // 4),
            disable_tqdm=True,
            seed=cfg.seed,
            dataloader_num_workers=0,
        )
        tok = rm.tokenizer
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
        load = time.time() - t0
        t1 = time.time()
        result = trainer.train()
        train_s = time.time() - t1
    row = {
        "trainer": "trl RewardTrainer",
        "n_train": len(train),
        "load_s": round(load, 1),
        "train_s": round(train_s, 1),
    }
    row.update(steps=result.global_step, train_loss=result.training_loss, n_kept=len(trainer.train_dataset))
    for name, pairs in tests.items():
        t = time.time()
        row[name] = accuracy_by_length(*score_seqcls(trainer.model, rm, pairs), pairs)
        row[name]["score_s"] = round(time.time() - t, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,500", help="training sizes for ours (first N HH pairs)")
    ap.add_argument("--trl-sizes", default="500", help="training sizes for TRL's RewardTrainer ('' = none)")
    ap.add_argument("--odin-sizes", default="", help="sizes to train ours again with ODIN's length head")
    ap.add_argument("--test-limit", type=int, default=354, help="last M HH pairs as the test set")
    ap.add_argument("--oasst-limit", type=int, default=100, help="first K OASST pairs as a second test set")
    ap.add_argument("--out", default=str(Path(__file__).with_name("reward.json")))
    ap.add_argument("--speed-pairs", type=int, default=0, help="only time training on N pairs: ours, TRL, ours, TRL")
    args = ap.parse_args(argv)
    cfg = dataclasses.replace(Config(), reward_epochs=1)  # one pass, as TRL's run
    torch.manual_seed(cfg.seed)
    hh = list(read_pairs(HH))
    train_pool, hh_test = hh[:2000], hh[-args.test_limit :]
    tests = {"hh_test": hh_test, "oasst": list(read_pairs(OASST))[: args.oasst_limit]}
    baselines = {name: _length_accuracy(p) for name, p in tests.items()}
    baselines["hh_first300"] = _length_accuracy(hh[:300])
    print(f"length-only baseline (longer answer wins): {baselines}", flush=True)
    started = time.time()
    if args.speed_pairs:  # alternate in one process so both see the same machine load
        rows = []
        for _ in range(2):
            row, rm = run_ours(cfg, train_pool[: args.speed_pairs], {})
            rows += [row, run_trl(cfg, train_pool[: args.speed_pairs], {}, rm)]
            for r in rows[-2:]:
                print(
                    f"{r['trainer']:18} {r['n_train']:5d} pairs {r['steps']:3d} steps {r['train_s']:7.1f} s", flush=True
                )
            del rm
        out = Path(args.out).with_name("reward_speed.json")
        out.write_text(json.dumps({"rows": rows, "seconds": round(time.time() - started, 1)}, indent=1))
        return 0
    rows = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    trl_sizes = {int(s) for s in args.trl_sizes.split(",") if s}
    odin_sizes = {int(s) for s in args.odin_sizes.split(",") if s}
    for n in sorted(set(sizes) | odin_sizes):
        if n in sizes:
            row, rm = run_ours(cfg, train_pool[:n], tests)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if n in trl_sizes:
                rows.append(run_trl(cfg, train_pool[:n], tests, rm))
                print(json.dumps(rows[-1]), flush=True)
            del rm
        if n in odin_sizes:
            rows.append(run_ours(dataclasses.replace(cfg, reward_length_head=True), train_pool[:n], tests)[0])
            print(json.dumps(rows[-1]), flush=True)

    base = length_baselines(tests["hh_test"])
    head = f"{'trainer':18} {'N':>5} {'steps':>5} {'train s':>8} {'HH acc':>7} {'HH short':>8} {'HH simlen':>9}"
    print(f"\n{head} {'OASST':>6}")
    for r in rows:
        h = r["hh_test"]
        print(
            f"{r['trainer']:18} {r['n_train']:5d} {r['steps']:5d} {r['train_s']:8.1f} {h['accuracy']:7.3f} "
            f"{h['shorter_chosen_accuracy']:8.3f} {h['similar_length_accuracy']:9.3f} {r['oasst']['accuracy']:6.3f}"
        )
    print(
        f"{'length baseline':18} {'':5} {'':5} {'':8} {baselines['hh_test']:7.3f} {0.0:8.3f} "
        f"{base['similar_length_baseline']:9.3f} {baselines['oasst']:6.3f}"
    )
    print(
        f"HH test: {base['n_shorter_chosen']} pairs with the shorter answer chosen, {base['n_similar_length']} similar"
    )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("reward_") or k in ("model",)},
        "n_test": {k: len(v) for k, v in tests.items()},
        "length_baseline": baselines,
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"total {report['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
