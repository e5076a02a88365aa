"""Policy: NF4 + LoRA layout, adapter round trip, streaming limits, truncation, swap, bad input."""

import dataclasses

import bitsandbytes as bnb
import pytest
import torch
from conftest import build_tiny_lm

from rlhf_live.config import Config
from rlhf_live.model.lora import AdapterError
from rlhf_live.serving.policy import Policy
from rlhf_live.serving.settings import GenerationSettings, InvalidRequest

HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def policy(tiny_cfg):
    return Policy.from_config(tiny_cfg)


def _logits(policy, text="What is the weather like?"):
    ids = torch.tensor(
        [policy.build_prompt([{"role": "user", "content": text}], GenerationSettings(max_new_tokens=16))[0]]
    )
    with torch.no_grad():
        return policy.model(input_ids=ids).logits


def test_4bit_base_has_bnb_linear_layers_and_only_lora_trains(tiny_cfg):
    from rlhf_live.model.base import load_base
    from rlhf_live.model.lora import attach_adapter

    tiny_cfg.load_in_4bit = True
    tiny_cfg.compute_dtype = "bfloat16"
    base, _ = load_base(tiny_cfg)
    model = attach_adapter(base, tiny_cfg, trainable=True)
    base_linears = [m for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))]
    assert base_linears and all(isinstance(m, bnb.nn.Linear4bit) for m in base_linears)
    assert all(m.weight.quant_type == "nf4" for m in base_linears)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_saved_adapter_loads_back_with_same_logits(policy, tiny_cfg, tmp_path):
    # Move B off zero so the adapter changes the output (a fresh LoRA equals the base).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = _logits(policy)
    policy.model.save_pretrained(tmp_path / "v0001")
    reloaded = Policy.from_config(tiny_cfg, adapter_path=tmp_path / "v0001")
    assert reloaded.version == "v0001"
    after = _logits(reloaded)
    assert not torch.allclose(before, _logits(Policy.from_config(tiny_cfg)), atol=1e-3)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # float32, same weights: equal up to rounding


def _trained_looking_adapter(policy: Policy, folder) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    policy.model.save_pretrained(folder)


@pytest.mark.parametrize("dequantize", [True, False])
def test_a_swapped_adapter_serves_the_trained_policy(tiny_cfg, tmp_path, dequantize):
    """NF4 on CPU: an adapter hot-swapped in after serving began gives the same logits as loading it fresh."""
    folder = build_tiny_lm(tmp_path / "lm128", hidden=128, layers=3)  # NF4 needs rows of 64+ values
    cfg = dataclasses.replace(
        tiny_cfg, model=str(folder), load_in_4bit=True, compute_dtype="bfloat16", cpu_dequantize=dequantize
    )
    _trained_looking_adapter(Policy.from_config(cfg), tmp_path / "v0001")
    served = Policy.from_config(cfg)
    served.generate(HELLO, GenerationSettings(max_new_tokens=3, temperature=0))  # serving ran a no-grad forward
    served.swap(tmp_path / "v0001", "v0001")
    fresh = Policy.from_config(cfg, adapter_path=tmp_path / "v0001")
    assert not torch.allclose(_logits(fresh), _logits(Policy.from_config(cfg)), atol=1e-2)
    torch.testing.assert_close(_logits(served), _logits(fresh))


def test_unguarded_packed_nf4_is_corrupted_by_an_adapter_load(tiny_cfg, tmp_path):
    """What prepare_cpu_4bit prevents: bitsandbytes packs CPU NF4 on a no-grad forward; a PEFT load then breaks it."""
    from rlhf_live.model.base import load_base
    from rlhf_live.model.lora import attach_adapter

    folder = build_tiny_lm(tmp_path / "lm128", hidden=128, layers=3)
    cfg = dataclasses.replace(tiny_cfg, model=str(folder), load_in_4bit=True, compute_dtype="bfloat16")
    _trained_looking_adapter(Policy.from_config(cfg), tmp_path / "v0001")
    base, _ = load_base(cfg)  # no prepare_cpu_4bit
    model = attach_adapter(base, cfg)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 12]])
    with torch.no_grad(), model.disable_adapter():
        before = model(input_ids=ids).logits  # packs the weights
        model.load_adapter(str(tmp_path / "v0001"), adapter_name="v0001")
        after = model(input_ids=ids).logits  # the base alone, adapter still disabled
    assert not torch.allclose(before, after, atol=1e-2)


def test_stream_yields_incremental_text_and_stops_at_the_limit(policy):
    stream = policy.stream(HELLO, GenerationSettings(max_new_tokens=10, temperature=1.0, seed=3))
    steps = [texts[0] for texts in stream]
    (answer,) = stream.answers
    assert len(steps) >= 2 and steps[-1] == answer.text
    assert all(b.startswith(a) or a.endswith("\ufffd") for a, b in zip(steps, steps[1:]))
    assert answer.finish_reason in {"eos", "length"}
    assert len(answer.token_ids) <= 10
    if answer.finish_reason == "length":
        assert len(answer.token_ids) == 10


def test_stream_stops_at_eos(policy):
    eos = policy.tokenizer.eos_token_id
    calls = []

    def eos_after_three_tokens(module, inputs, logits):
        calls.append(1)
        if len(calls) > 3:  # call 1 scores the first answer token; from the 4th token on, force EOS
            logits[..., eos] = 1e4
        return logits

    hook = policy.model.get_output_embeddings().register_forward_hook(eos_after_three_tokens)
    try:
        (answer,) = policy.generate(HELLO, GenerationSettings(max_new_tokens=8, temperature=1.0, seed=0))
    finally:
        hook.remove()
    assert answer.finish_reason == "eos"
    assert len(answer.token_ids) == 3 and eos not in answer.token_ids


def test_two_answers_in_one_batch(policy):
    answers = policy.generate(HELLO, GenerationSettings(max_new_tokens=6, temperature=1.0, seed=0), n=2)
    assert len(answers) == 2 and all(a.adapter_version == "base" for a in answers)


def test_overlong_history_is_truncated_keeping_system_and_newest(policy):
    turns = []
    for i in range(60):
        turns.append({"role": "user", "content": f"question {i} " + "apples " * 20})
        turns.append({"role": "assistant", "content": f"answer {i} " + "bananas " * 20})
    turns.append({"role": "user", "content": "final question"})
    settings = GenerationSettings(max_new_tokens=16, system_prompt="You are terse.")
    ids, dropped = policy.build_prompt(turns, settings)
    text = policy.tokenizer.decode(ids)
    assert len(ids) <= policy.cfg.max_context_tokens - 16
    assert dropped > 0 and "You are terse." in text and "final question" in text and "question 0 " not in text
    stream = policy.stream(turns, settings)
    stream.wait()
    assert stream.dropped_messages == dropped


def test_one_huge_message_keeps_its_end(policy):
    huge = "apples " * 400 + "THE END?"
    ids, _ = policy.build_prompt([{"role": "user", "content": huge}], GenerationSettings(max_new_tokens=16))
    assert len(ids) <= policy.cfg.max_context_tokens - 16
    assert "THE END?" in policy.tokenizer.decode(ids)


def test_bad_messages_are_refused_with_a_sentence(policy):
    with pytest.raises(InvalidRequest, match="empty"):
        policy.check_message("   ")
    with pytest.raises(InvalidRequest, match="limit is 4,000"):
        policy.check_message("x" * 4001)
    assert policy.check_message("  hi  ") == "hi"
    with pytest.raises(InvalidRequest, match="end with a user message"):
        policy.build_prompt([{"role": "assistant", "content": "hi"}], GenerationSettings(max_new_tokens=16))


def test_swap_changes_the_served_adapter_and_rejects_corrupt_folders(policy, tmp_path):
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.model.save_pretrained(tmp_path / "v0002")
    trained = _logits(policy)
    policy.swap(None, "base")
    base = _logits(policy)
    assert not torch.allclose(base, trained, atol=1e-3)
    policy.swap(tmp_path / "v0002", "v0002")
    torch.testing.assert_close(_logits(policy), trained, atol=1e-5, rtol=1e-5)
    assert policy.version == "v0002" and len(policy.model.peft_config) == 1  # old adapters are freed

    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "adapter_config.json").write_text("{not json")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterError):
        policy.swap(tmp_path / "corrupt", "v0003")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        policy.swap(tmp_path / "nowhere", "v0004")
    assert policy.version == "v0002"
    torch.testing.assert_close(_logits(policy), trained, atol=1e-5, rtol=1e-5)  # still serving the good one
    assert policy.generate(HELLO, GenerationSettings(max_new_tokens=3))[0].adapter_version == "v0002"


def test_answers_from_an_older_version_in_the_same_batch(policy, tmp_path):
    policy.model.save_pretrained(tmp_path / "v0001")
    policy.load_for_comparison(tmp_path / "v0001", "v0001")
    answers = policy.generate(
        HELLO, GenerationSettings(max_new_tokens=4, temperature=0), n=2, versions=["base", "v0001"]
    )
    assert [a.adapter_version for a in answers] == ["base", "v0001"]
    assert answers[0].token_ids == answers[1].token_ids  # v0001 is a fresh (B=0) LoRA: greedy answers agree
    with pytest.raises(InvalidRequest, match="not loaded"):
        policy.stream(HELLO, n=1, versions=["v0099"])


@pytest.mark.slow
def test_real_policy_streams_paris_in_nf4(real_model_dir):
    cfg = Config(model=str(real_model_dir), max_new_tokens=32)
    policy = Policy.from_config(cfg)
    q_proj = policy.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    # On CPU the NF4 values run as plain bf16 linears (models.prepare_cpu_4bit); on CUDA bitsandbytes' kernels.
    assert isinstance(q_proj, bnb.nn.Linear4bit if torch.cuda.is_available() else torch.nn.Linear)
    stream = policy.stream(
        [{"role": "user", "content": "What is the capital of France?"}], GenerationSettings(temperature=0)
    )
    steps = [t[0] for t in stream]
    assert len(steps) > 3 and "Paris" in stream.answers[0].text and stream.answers[0].finish_reason == "eos"


@pytest.mark.parametrize("how", ["never read", "dropped mid-answer", "reader raised"])
def test_a_stream_that_is_not_finished_never_blocks_a_swap(policy, how):
    """The read side of the adapter lock is released however a stream ends (before: an unread stream held it)."""
    import gc
    import threading

    s = policy.stream([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=8))
    if how == "dropped mid-answer":
        next(iter(s))
    elif how == "reader raised":
        try:
            for _ in s:
                raise RuntimeError("the browser went away")
        except RuntimeError:
            pass
    del s
    gc.collect()
    done = threading.Event()
    threading.Thread(target=lambda: (policy.swap(None, "fresh"), done.set()), daemon=True).start()
    assert done.wait(20), "swap() waited forever for a stream nobody reads"
    assert policy.generating == 0 and policy.version == "fresh"


def test_mixed_adapter_batches_and_plain_generations_run_side_by_side(policy, tmp_path):
    """PEFT's mixed-batch hooks are global: a plain generation beside a base-vs-live batch must not see them."""
    import threading

    policy.model.save_pretrained(tmp_path / "v1")
    policy.swap(tmp_path / "v1", "v1")
    errors = []
    settings = GenerationSettings(max_new_tokens=6)

    def loop(fn):
        try:
            for _ in range(25):
                fn()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    mixed = lambda: policy.generate([{"role": "user", "content": "Hi"}], settings, n=2, versions=["v1", "base"])  # noqa: E731
    plain = lambda: policy.generate([{"role": "user", "content": "Hello"}], settings)  # noqa: E731
    threads = [threading.Thread(target=loop, args=(fn,)) for fn in (mixed, plain, plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
