"""The llama.cpp engine serves the policy that was trained: same next-token distributions, streams, swaps, cancels."""

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_live.config import Config
from rlhf_live.model.base import load_base, prepare_cpu_4bit
from rlhf_live.model.lora import BASE, AdapterError, attach_adapter
from rlhf_live.model.sampling import penalize
from rlhf_live.serving import gguf_export
from rlhf_live.serving.engine_files import start_engine
from rlhf_live.serving.gguf_export import GGUFExportError, write_gguf_lora
from rlhf_live.serving.llamacpp import EngineError, LlamaCppEngine
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings

PROMPTS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}],
]


def _random_lora(cfg: Config, folder, seed: int, scale: float = 0.05):
    """A LoRA on every linear of the real model with B != 0, as training leaves it, saved as an adapter folder."""
    base, _ = load_base(cfg)
    prepare_cpu_4bit(base, cfg)
    with torch.random.fork_rng():  # lora_A's random init too: the same adapter every run
        torch.manual_seed(seed)
        model = attach_adapter(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    cfg = Config(engine="torch")
    return _random_lora(cfg, root / "v0001", 1), _random_lora(cfg, root / "v0002", 2)


@pytest.fixture(scope="module")
def served(adapters):
    policy = Policy.from_config(Config(engine="llamacpp", max_new_tokens=24), adapters[0], "v0001")
    assert policy.engine_name == "llamacpp"
    return policy


def _torch_logprobs(policy, ids, version) -> np.ndarray:
    with torch.inference_mode():
        out = policy.model(input_ids=torch.tensor([ids]), adapter_names=[policy._peft_name(version)])
    return torch.log_softmax(out.logits[0, -1].float(), -1).numpy()


def _engine_logprobs(engine, ids, version, n_vocab, penalty=None) -> np.ndarray:
    lp = np.full(n_vocab, -np.inf)
    for token, value in engine.next_logprobs(ids, None if version == BASE else version, n_vocab, penalty).items():
        lp[token] = value
    return lp


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) over the tokens q gives a finite log-prob (llama.cpp returns all of them)."""
    keep = np.isfinite(q)
    return float((np.exp(p[keep]) * (p[keep] - q[keep])).sum())


def _contexts(policy) -> list[list[int]]:
    """Prompt ids, and the same prompts with a few answer tokens: positions inside an answer count too."""
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    out = []
    for messages in PROMPTS:
        ids = policy.build_prompt(messages, settings)[0]
        out += [ids, ids + policy.generate(messages, settings)[0].token_ids]
    return out


@pytest.mark.slow
def test_llamacpp_serves_the_trained_policy(served, adapters, tmp_path):
    n_vocab = len(served.tokenizer)
    mismatch, effect = [], []
    for ids in _contexts(served):
        for version in ("v0001", BASE):
            mismatch.append(
                _kl(_torch_logprobs(served, ids, version), _engine_logprobs(served.engine, ids, version, n_vocab))
            )
        effect.append(_kl(_torch_logprobs(served, ids, "v0001"), _torch_logprobs(served, ids, BASE)))
    # What llama.cpp samples from is what was trained (NF4 values in q8_0, the default, with the LoRA merged), far
    # within what the adapter itself changes: measured mean 0.006-0.011, max 0.015-0.023 nats (f16 weights:
    # 0.001-0.002) against an adapter effect of ~0.1-0.6. At 0.02 a token a 100-token answer moves 2 nats: a tenth
    # of PPO's KL budget (max_kl_per_answer 20).
    assert np.mean(mismatch) < 0.02 and max(mismatch) < 0.05, mismatch
    assert np.mean(effect) > 10 * np.mean(mismatch), (np.mean(effect), np.mean(mismatch))

    # Converted without llama.cpp's q/k row permutation, an adapter is measurably a different policy. A stronger
    # adapter, so that the error shows above the quantization noise (with B ~ 0.05 the two were within 2x-8x), but not
    # so strong that q8_0's rounding of its activations dominates: over 5 seeds' A, B ~ 0.15 gave 0.005-0.085 nats
    # permuted vs 0.1-1.7 unpermuted (22-43x on the mean); B ~ 0.3 gave up to 1.2 permuted (8-39x, 2 contexts: 2-96x).
    strong = _random_lora(Config(engine="torch"), tmp_path / "strong", 3, scale=0.15)
    served.load_for_comparison(strong, "strong")
    config = served.model.config.to_dict()
    contexts = _contexts(served)
    reference = [_torch_logprobs(served, ids, "strong") for ids in contexts]  # the same for both conversions
    kl_by_permutation = {}
    for permuted in (True, False):
        original = gguf_export.PERMUTED_QK
        gguf_export.PERMUTED_QK = original if permuted else set()
        try:
            path = write_gguf_lora(strong, config, tmp_path / f"strong-{permuted}.gguf")
        finally:
            gguf_export.PERMUTED_QK = original
        engine = LlamaCppEngine(served.engine.model, threads=1, parallel=1, n_ctx=512)
        engine.set_adapters({"strong": path})
        kl_by_permutation[permuted] = [
            _kl(p, _engine_logprobs(engine, ids, "strong", n_vocab)) for p, ids in zip(reference, contexts)
        ]
    assert np.mean(kl_by_permutation[False]) > 5 * np.mean(kl_by_permutation[True]), kl_by_permutation


@pytest.mark.slow
def test_llamacpp_penalises_repetition_as_torch_does(served):
    """The repetition penalty in llama.cpp is sampling.penalize over the same window: prompt and answer tokens."""
    n_vocab, penalty, last_n = len(served.tokenizer), 1.5, 64
    mismatch, prompt_excluded = [], []
    contexts = _contexts(served)
    for k, ids in enumerate(contexts):
        with torch.inference_mode():
            logits = served.model(input_ids=torch.tensor([ids]), adapter_names=[served._peft_name("v0001")]).logits
        last = logits[0, -1:].float()  # (1, V)
        window = torch.tensor([ids[-last_n:]])
        ours = torch.log_softmax(penalize(last, window, torch.ones_like(window, dtype=torch.bool), penalty), -1)
        engine = _engine_logprobs(served.engine, ids, "v0001", n_vocab, (penalty, last_n))
        mismatch.append(_kl(ours[0].numpy(), engine))
        # The same rule over the answer's tokens alone (not the prompt's) is measurably another distribution.
        answer = torch.tensor([ids[len(contexts[k - k % 2]) :][-last_n:] or [0]])  # contexts: prompt, prompt+answer
        alone = torch.log_softmax(penalize(last, answer, torch.ones_like(answer, dtype=torch.bool), penalty), -1)
        prompt_excluded.append(_kl(alone[0].numpy(), engine))
    print("penalty parity KL", mismatch, "prompt excluded", prompt_excluded)
    assert np.mean(mismatch) < 0.02 and max(mismatch) < 0.05, mismatch
    assert np.mean(prompt_excluded) > 10 * np.mean(mismatch), (prompt_excluded, mismatch)


@pytest.mark.slow
def test_llamacpp_streams_two_versions_at_once_like_torch(served):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)
    stream = served.stream(PROMPTS[0], settings, n=2, versions=["v0001", BASE])
    steps = list(stream)
    assert len(steps) >= 2 and steps[-1] == tuple(a.text for a in stream.answers)
    engine = served.engine
    served.engine = None  # the torch reference on the same weights
    try:
        reference = served.generate(PROMPTS[0], settings, n=2, versions=["v0001", BASE])
    finally:
        served.engine = engine
    for got, want in zip(stream.answers, reference):
        assert got.adapter_version == want.adapter_version
        assert got.finish_reason in ("eos", "length") and 0 < len(got.token_ids) <= 12
        assert got.text == served.tokenizer.decode(got.token_ids, skip_special_tokens=True)
        assert got.token_ids[:1] == want.token_ids[:1]  # greedy: the same first token


@pytest.mark.slow
def test_llamacpp_cancel_stops_an_answer(served):
    stream = served.stream(PROMPTS[1], GenerationSettings(max_new_tokens=200, temperature=1.0, seed=0))
    for i, _ in enumerate(stream):
        if i == 2:
            stream.cancel()
    answer = stream.answers[0]
    assert answer.finish_reason in ("cancelled", "eos") and len(answer.token_ids) < 200
    assert served.generating == 0


@pytest.mark.slow
def test_llamacpp_swap_serves_the_new_adapter_and_survives_a_corrupt_folder(served, adapters, tmp_path):
    n_vocab = len(served.tokenizer)
    ids = _contexts(served)[0]
    before = _engine_logprobs(served.engine, ids, "v0001", n_vocab)
    corrupt = tmp_path / "v0009"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError):
        served.swap(corrupt, "v0009")
    assert served.version == "v0001"
    np.testing.assert_allclose(_engine_logprobs(served.engine, ids, "v0001", n_vocab), before, atol=1e-4)

    served.load_for_comparison(adapters[0], "v0001-old")  # an older version kept for A/B answers
    served.swap(adapters[1], "v0002")
    assert "v0001-old" not in served.comparable_versions  # comparison adapters go with the old live one
    now = _engine_logprobs(served.engine, ids, "v0002", n_vocab)
    match = _kl(_torch_logprobs(served, ids, "v0002"), now)
    assert match < 0.05 and _kl(now, before) > 5 * match  # the new adapter is served, not the old one
    served.load_for_comparison(adapters[0], "v0001-old")  # loaded again when a Compare asks for it
    old = _engine_logprobs(served.engine, ids, "v0001-old", n_vocab)
    np.testing.assert_allclose(old, before, atol=1e-3)

    served.swap(None, "v0003")  # a fresh LoRA samples as the base
    fresh = served.generate(PROMPTS[2], GenerationSettings(max_new_tokens=8, temperature=0.0))[0]
    base = served.generate(PROMPTS[2], GenerationSettings(max_new_tokens=8, temperature=0.0), versions=[BASE])[0]
    assert fresh.adapter_version == "v0003" and fresh.token_ids == base.token_ids


@pytest.mark.slow
def test_llamacpp_answers_concurrent_chats(served):
    settings = GenerationSettings(max_new_tokens=16, temperature=0.7, seed=1)
    results = [None] * 4

    def chat(i):
        results[i] = served.generate(PROMPTS[i % len(PROMPTS)], settings)[0]

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.token_ids and r.finish_reason in ("eos", "length") for r in results)


def test_engine_choice(tiny_cfg):
    base, _ = load_base(tiny_cfg)
    model = attach_adapter(base, tiny_cfg)
    assert start_engine(Config(engine="torch"), model) is None
    assert start_engine(dataclasses.replace(tiny_cfg, engine="auto"), model) is None  # a folder, not a GGUF: torch
    policy = Policy.from_config(dataclasses.replace(tiny_cfg, engine="auto"))
    assert policy.engine_name == "torch"
    assert (
        policy.engine_note == "serving with torch: llama.cpp cannot run here (the base is not from a GGUF file "
        "(llama.cpp needs its tokenizer metadata))"
    )
    from rlhf_live.serving.service import Service
    from rlhf_live.store import Store

    status = Service(policy, Store.from_config(tiny_cfg), tiny_cfg).dashboard.status()
    assert (status["engine"], status["engine_note"]) == ("torch", policy.engine_note)
    with pytest.raises(EngineError, match="not from a GGUF file"):
        start_engine(dataclasses.replace(tiny_cfg, engine="llamacpp"), model)
    with pytest.raises(ValueError, match="engine must be"):
        start_engine(Config(engine="vllm"), model)


@pytest.mark.slow
def test_auto_serves_the_default_model_with_llamacpp_and_torch_when_it_cannot_start(monkeypatch):
    policy = Policy.from_config(Config(max_new_tokens=8))
    assert Config().engine == "auto" and (policy.engine_name, policy.engine_note) == ("llamacpp", "")

    def broken(*args, **kwargs):
        raise EngineError("the llama.cpp process exited")

    monkeypatch.setattr("rlhf_live.serving.llamacpp.LlamaCppEngine", broken)
    fallback = Policy.from_config(Config(max_new_tokens=8))
    assert fallback.engine_name == "torch"
    assert fallback.engine_note == "serving with torch: llama.cpp failed to start (the llama.cpp process exited)"
    assert fallback.generate(PROMPTS[0], GenerationSettings(max_new_tokens=4, temperature=0.0))[0].token_ids
    with pytest.raises(EngineError, match="exited"):  # asked for by name, it is an error, not a fallback
        Policy.from_config(Config(engine="llamacpp", max_new_tokens=8))


def test_lora_gguf_names_shapes_alpha_and_refusals(tiny_cfg, tmp_path):
    import gguf

    base, _ = load_base(tiny_cfg)
    model = attach_adapter(base, tiny_cfg)
    model.save_pretrained(tmp_path / "v0001")
    config = model.config.to_dict()
    out = write_gguf_lora(tmp_path / "v0001", config, tmp_path / "v0001.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == tiny_cfg.lora_alpha
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    hidden, r = config["hidden_size"], tiny_cfg.lora_r
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    assert shapes["blk.0.attn_q.weight.lora_a"] == (hidden, r)  # ggml order: (in, rank)
    assert shapes["blk.1.attn_k.weight.lora_b"] == (r, kv)  # (rank, out)
    assert len(shapes) == 2 * 7 * config["num_hidden_layers"]

    cfg_json = tmp_path / "v0001" / "adapter_config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "use_dora": True}))
    with pytest.raises(GGUFExportError, match="DoRA"):
        write_gguf_lora(tmp_path / "v0001", config, tmp_path / "dora.gguf")


def test_permutation_matches_llamacpp_rope_layout():
    # Two heads of 4 rows: HF's rotate-half order (x0 x1 | y0 y1) becomes llama.cpp's interleaved (x0 y0 x1 y1).
    rows = np.arange(8)[:, None]
    assert gguf_export._permute(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_served_gguf_cache_is_keyed_by_what_the_weights_are(monkeypatch, tmp_path):
    template = tmp_path / "base.gguf"
    template.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf_export, "write_gguf_model", lambda sd, config, tpl, out, qtype: out)
    bf16 = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    fp32 = {"w": torch.zeros(2, dtype=torch.float32)}
    nf4 = {"quantization_config": {"load_in_4bit": True}}
    paths = {
        gguf_export.cached_model_gguf(bf16, {}, template, tmp_path, "f16"),
        gguf_export.cached_model_gguf(fp32, {}, template, tmp_path, "f16"),  # fp32 compute: other values
        gguf_export.cached_model_gguf(bf16, nf4, template, tmp_path, "f16"),
        gguf_export.cached_model_gguf(bf16, {}, template, tmp_path, "q8_0"),
    }
    assert len(paths) == 4
    assert gguf_export.cached_model_gguf(bf16, {}, template, tmp_path, "f16") in paths  # same inputs, same file


def test_per_version_files_are_pruned_to_the_newest_but_never_what_serves(tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    names = ["m-served-f16-a.gguf", *(f"m-merged-f16-{i}.gguf" for i in range(5)), "lora-x.gguf", "lora-y.gguf"]
    for age, name in enumerate(names):  # the first written is the oldest
        (folder / name).write_bytes(b"GGUF")
        os.utime(folder / name, (1000 + age, 1000 + age))
    serving = folder / "m-merged-f16-0.gguf"  # the oldest, but a version still served
    dropped = gguf_export.prune_cache(tmp_path, {serving}, newest=3)
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["lora-x.gguf", "lora-y.gguf", "m-merged-f16-0.gguf", "m-merged-f16-4.gguf", "m-served-f16-a.gguf"]
    assert sorted(p.name for p in dropped) == ["m-merged-f16-1.gguf", "m-merged-f16-2.gguf", "m-merged-f16-3.gguf"]


def test_a_merged_version_is_the_base_plus_alpha_over_r_b_a(tiny_cfg, tmp_path):
    """merge_lora folds the LoRA in exactly as PEFT computes it: W + alpha / r * B @ A on every target."""
    from rlhf_live.serving.engine_files import served_base
    from rlhf_live.serving.gguf_export import merge_lora

    base, _ = load_base(tiny_cfg, tiny_cfg.model)
    model = attach_adapter(base, tiny_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(tmp_path / "v1")
    merged = merge_lora(served_base(model), tmp_path / "v1")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = type(model.get_base_model())(model.config)
        loaded = plain.load_state_dict({k: v.float() for k, v in merged.items()}, strict=False)
        assert set(loaded.missing_keys) <= {"lm_head.weight"} and not loaded.unexpected_keys  # tied embeddings
        plain.tie_weights()
        got = plain.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(GGUFExportError, match="only plain LoRA"):
        merge_lora(served_base(model), tmp_path / "dora")


@pytest.mark.slow
def test_a_prompt_prefilled_in_several_steps_is_the_same_policy(served, adapters):
    """engine_ubatch cuts a long prompt into prefill steps; the next-token distribution is still torch's."""
    served.swap(adapters[0], "v0001")  # tests before this one leave other versions serving
    assert served.engine.options == {"ubatch": Config().engine_ubatch} and Config().engine_ubatch < 512
    notes = " ".join(f"Item {i}: the team agreed to revisit point {i * 7 % 13} next week." for i in range(40))
    ids = served.build_prompt([{"role": "user", "content": notes + " Summarise."}], GenerationSettings())[0]
    assert len(ids) > 4 * Config().engine_ubatch  # several steps, and a last one that is not full
    n_vocab = len(served.tokenizer)
    for version in ("v0001", BASE):
        assert _kl(_torch_logprobs(served, ids, version), _engine_logprobs(served.engine, ids, version, n_vocab)) < 0.05


@pytest.mark.slow
def test_runtime_lora_mode_serves_the_trained_policy_too(adapters):
    policy = Policy.from_config(Config(engine="llamacpp", engine_merge=False, max_new_tokens=8), adapters[0], "v0001")
    n_vocab = len(policy.tokenizer)
    ids = _contexts(policy)[0]
    assert _kl(_torch_logprobs(policy, ids, "v0001"), _engine_logprobs(policy.engine, ids, "v0001", n_vocab)) < 0.05


@pytest.mark.slow
def test_the_trainers_prebuilt_file_is_the_one_serving_swaps_to(served, adapters, tmp_path):
    """The merged model written in training's time has the key serving looks for: the swap finds it ready."""
    from rlhf_live.learning.copies import TrainingCopies
    from rlhf_live.serving.engine_files import prebuild_engine_file, version_file

    cfg = dataclasses.replace(served.cfg, cache_dir=str(tmp_path / "cache"))
    copies = TrainingCopies(cfg)
    copies.policy_copy(str(adapters[1]))  # the trainer's copy, as a round leaves it
    assert prebuild_engine_file(cfg, copies.policy_model, adapters[1])
    (built,) = (tmp_path / "cache" / "gguf").glob("*-merged-*.gguf")
    inode = built.stat().st_ino  # a rewrite would replace the file
    served.cfg, before = cfg, served.cfg
    try:
        assert (
            version_file(cfg, served.model, adapters[1]) == built and built.stat().st_ino == inode
        )  # found, not rewritten
    finally:
        served.cfg = before


@pytest.mark.slow
def test_llamacpp_a_stream_in_flight_finishes_on_its_version_when_a_swap_comes(served, adapters):
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    served.swap(adapters[0], "v0001")
    stream = served.stream(PROMPTS[1], settings)
    steps = iter(stream)
    next(steps)  # the answer has started on v0001
    swapped = threading.Event()
    threading.Thread(target=lambda: (served.swap(adapters[1], "v0002"), swapped.set()), daemon=True).start()
    for _ in steps:
        pass
    (answer,) = stream.answers
    assert answer.adapter_version == "v0001"
    assert swapped.wait(30) and served.version == "v0002"  # the swap went through once the answer was done
    # Greedy: exactly v0001's answer from the same engine, and not v0002's.
    served.load_for_comparison(adapters[0], "v0001")
    again, other = (served.generate(PROMPTS[1], settings, versions=[v])[0] for v in ("v0001", "v0002"))
    assert answer.token_ids == again.token_ids != other.token_ids


@pytest.mark.slow
def test_a_swap_stops_the_llamacpp_process_of_the_version_it_replaced(served, adapters):
    """A long-running app swaps after every round: each old version's server (~450 MB) must go, not pile up."""
    import gc
    import time

    settings = GenerationSettings(max_new_tokens=4, temperature=0.0)
    served.swap(adapters[0], "v0001")
    served.generate(PROMPTS[0], settings)  # an answer on v0001: its callback must not keep the server alive
    old = served.engine._merged["v0001"]._proc
    served.swap(adapters[1], "v0002")
    deadline = time.monotonic() + 15
    while old.poll() is None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.2)
    assert old.poll() is not None and served.generate(PROMPTS[0], settings)[0].adapter_version == "v0002"


@pytest.mark.slow
def test_llamacpp_a_chats_next_turn_prefills_only_what_is_new(served):
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    history = [{"role": "user", "content": "Tell me about the history of bread in Europe. " * 20}]
    first = served.stream(history, settings)
    (answer,) = first.wait()
    turn = [*history, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And cheese?"}]
    second = served.stream(turn, settings)
    (reply,) = second.wait()
    assert reply.text and second.prompt_tokens > first.prompt_tokens + len(answer.token_ids)
    # The slot still holds the first prompt and the answer's tokens: all but the last one sampled, never fed back
    # (an end token is not in token_ids).
    fed = len(answer.token_ids) - (answer.finish_reason == "length")
    assert reply.cached_prompt_tokens == first.prompt_tokens + fed


@pytest.mark.slow
def test_llamacpp_a_swap_prefills_recent_chats_into_the_new_versions_cache(served, adapters):
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    served.swap(adapters[0], "v0001")
    history = [{"role": "user", "content": "Tell me about the history of cheese in Europe. " * 20}]
    first = served.stream(history, settings)
    (answer,) = first.wait()
    served.swap(adapters[1], "v0002")  # a new server, on v0002's file: its caches start empty but for the prefill
    turn = [*history, {"role": "assistant", "content": answer.text}, {"role": "user", "content": "And bread?"}]
    second = served.stream(turn, settings)
    (reply,) = second.wait()
    assert reply.adapter_version == "v0002"
    fed = len(answer.token_ids) - (answer.finish_reason == "length")
    assert reply.cached_prompt_tokens >= first.prompt_tokens + fed - 1  # the history, prefilled before the swap
    served.cfg.engine_warm_conversations = 0  # without the prefill, the same next turn starts cold
    try:
        served.swap(adapters[0], "v0001")
        (cold,) = served.stream(turn, settings).wait()
    finally:
        served.cfg.engine_warm_conversations = 4
    assert cold.cached_prompt_tokens < first.prompt_tokens // 2


@pytest.mark.slow
def test_llamacpp_serving_survives_its_process_dying(served):
    server, _ = served.engine._route(served.version)
    maps = Path(f"/proc/{server._proc.pid}/maps").read_text() if os.path.exists("/proc") else ""
    assert "libtorch" not in maps  # torch's OpenMP threads would slow every llama.cpp barrier in the same process
    stream = served.stream(PROMPTS[1], GenerationSettings(max_new_tokens=200, temperature=1.0, seed=0))
    steps = iter(stream)
    next(steps)
    os.kill(server._proc.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="exited"):
        for _ in steps:
            pass
    (answer,) = served.generate(PROMPTS[0], GenerationSettings(max_new_tokens=8, temperature=0.0))
    assert answer.token_ids and served.engine._route(served.version)[0]._proc.pid != server._proc.pid
