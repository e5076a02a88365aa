"""Reward model: a scalar head on the base LM (4-bit NF4 + its own LoRA), trained on people's votes.

What it knows:
- Architecture. The causal LM from `models.load_base` (the same loader, dtype and NF4 setting as the policy),
  its own LoRA, and a linear head H -> 1 on the final (normed) hidden state of the last token of
  "chat template(conversation) + answer + end of turn". We call the LM's decoder (`get_decoder()`) directly,
  never `lm_head`, so the 49k-vocabulary projection is not computed. Chosen over
  `AutoModelForSequenceClassification` because (1) the base is loaded once by the project's loader (GGUF
  conversion, NF4, devices) and may be handed in by the trainer, (2) the sequence-classification head finds the
  last token by searching for `pad_token_id`, which for SmolLM2 equals the end-of-turn token that ends every
  answer; we pad on the right ourselves and index the last real token from the attention mask.
  The LoRA sits on the top `reward_lora_layers` layers only (backward stops below them; ~2x faster steps), and
  on CPU the NF4 linears are dequantized to bf16 with the same values (`models.dequantize_cpu_4bit` says why).
- Objective (one loss, per example, averaged over the batch):
  A/B choice   Bradley-Terry  -logsigmoid(r_chosen - r_rejected)             (InstructGPT, arXiv 2203.02155, eq. 1)
  tie          w_tie * -0.5 * (logsigmoid(d) + logsigmoid(-d)), d = r_a - r_b  (BT with target 1/2: min at d = 0)
  thumbs       w_point * -logsigmoid(+r) for up, -logsigmoid(-r) for down     (logistic loss: "up" means r > 0)
  Ties and thumbs weights are Config.reward_tie_weight / reward_pointwise_weight. "Both bad" is not a kind of its
  own: the caller sends it as two thumbs-down. Thumbs anchor the reward's zero (BT alone is shift invariant).
- Length (optional, `reward_length_head`): ODIN's second head (arXiv 2402.07319). Training fits quality + length
  to the votes and adds `length_loss` (length correlates with the length head, not the quality head; orthogonal
  heads); `score` returns the quality head only, so PPO cannot buy reward with longer answers. Off by default: on
  data where length and quality always agree it leaves the quality head with nothing to learn (tests show both).
- Data hygiene: exact duplicates are dropped, pairs with identical answers carry no preference and are dropped,
  contradictory votes (A>B and B>A) are both kept (together they act like a tie). The held-out split is by
  conversation (`conversation_id` when given, else the first user message) so no conversation is in both parts.
- Training: AdamW, linear warm-up then linear decay, gradient clipping at 1, batches of similar lengths
  (less padding), held-out loss twice per epoch, early stopping on it and the best weights restored.
- Truncation: at most Config.reward_max_tokens per sequence; the conversation is cut by the one renderer
  (model/prompt.py: the oldest turns go, the system prompt stays), the answer is never cut at its end; an answer
  longer than the whole budget keeps its end and is counted in the metrics (`n_answer_truncated`).
- Normalisation: mean/std of raw scores over a set of answers, applied by `score(normalise=True)`. `fit` uses
  `reward_norm_samples` training answers: in the live app those are the served model's own answers to users, so
  close to the reference-policy samples TRL/OpenAI normalised on, without an extra rollout; `set_normalisation`
  takes any other set.

What it does not know: where votes come from (no store, no UI), PPO, or adapter versioning. `save()` writes PEFT's
adapter files plus `reward_head.safetensors` and `reward_meta.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from rlhf_live.config import Config
from rlhf_live.model.base import load_base, prepare_cpu_4bit
from rlhf_live.model.lora import lora_targets
from rlhf_live.model.prompt import Rendered, answer_ids, render

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_meta.json"
EVALS_PER_EPOCH = 2
MAX_TOKENS_PER_FORWARD = 4096
"""Padded tokens per forward pass in training (~3 GB of activations for SmolLM2-135M with LoRA on all layers)."""


class RewardDataError(ValueError):
    """The feedback given to the reward model cannot be used; the message says why and what is needed."""


# --- losses ------------------------------------------------------------------------------------------------
def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood per pair, -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def tie_loss(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry with target 1/2 per tie: minimal (log 2) exactly when r_a == r_b."""
    d = r_a - r_b
    return -0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))


def pointwise_loss(r: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Logistic loss per thumb: -log sigmoid(r) for a thumbs-up, -log sigmoid(-r) for a thumbs-down."""
    return -F.logsigmoid(torch.where(up, r, -r))


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two (N,) vectors; 0 when either is constant."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def length_loss(
    r_quality: torch.Tensor,
    r_length: torch.Tensor,
    lengths: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
) -> torch.Tensor:
    """ODIN's disentangling loss (Chen et al. 2024, arXiv 2402.07319, eq. 4-5) over a batch of answers.

    |corr(r_quality, length)| - corr(r_length, length) pushes length into the length head and out of the quality
    head; |cos(w_quality, w_length)| keeps the two heads orthogonal (ODIN uses the raw inner product; the cosine
    does not reward shrinking the weights). In [-1, 3]: -1 when fully disentangled.
    """
    lengths = lengths.float()  # (N,)
    cos = F.cosine_similarity(w_quality.flatten(), w_length.flatten(), dim=0)
    return _corr(r_quality, lengths).abs() - _corr(r_length, lengths) + cos.abs()


# --- input -------------------------------------------------------------------------------------------------
PAIR, TIE, POINT = "pair", "tie", "point"


@dataclass
class _Example:
    """One unit of feedback: a pair (seqs = chosen, rejected), a tie (a, b) or a thumb (answer; up)."""

    kind: str
    prompt: list[dict]
    answers: tuple[str, ...]
    group: str
    up: bool = False
    ids: list[list[int]] = field(default_factory=list)
    weight: float = 1.0
    """Its share of the loss (crowd.capped_weights: a source over its cap counts for less; flagged ones are dropped)."""
    source: str = ""
    """Who cast it (the store's voter_source; '' unknown): what the leave-one-source-out test groups by."""

    @property
    def length(self) -> int:
        return max(len(s) for s in self.ids)


def _get(item, name: str, index: int, what: str):
    """`item.name` or `item[name]`; RewardDataError naming the item when absent."""
    if isinstance(item, dict):
        if name in item:
            return item[name]
    elif hasattr(item, name):
        return getattr(item, name)
    raise RewardDataError(f"{what} #{index} has no '{name}' (expected keys {_KEYS[what]}).")


_KEYS = {"pair": "prompt, chosen, rejected", "tie": "prompt, a, b", "thumb": "prompt, completion, label"}


def as_messages(prompt) -> list[dict]:
    """A conversation as chat messages: a list of {role, content} dicts, or a string (one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(
        isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise RewardDataError("a prompt must be a string or a list of {role, content} messages")


def _field(item, name: str):
    """`item[name]` or `item.name`, None when absent."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _weight_of(item, index: int, what: str) -> float:
    """The item's training weight (1 when it has none); RewardDataError unless finite and >= 0."""
    weight = _field(item, "weight")
    if weight is None:
        return 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RewardDataError(f"{what} #{index}: weight must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _group_of(item, messages: list[dict]) -> str:
    """Held-out unit: the conversation id when known, else the first user message (turns of one chat stay together)."""
    cid = _field(item, "conversation_id")
    if cid is None and not isinstance(item, dict):
        cid = (getattr(item, "meta", None) or {}).get("conversation_id")
    if cid not in (None, ""):
        return f"id:{cid}"
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"] if messages else "")
    return f"text:{first}"


def _collect(pairs, ties, pointwise) -> tuple[list[_Example], dict]:
    """Validate and de-duplicate the feedback; counts of what was dropped and why."""
    out: list[_Example] = []
    seen: set[str] = set()
    counts = {"n_duplicates": 0, "n_identical_dropped": 0, "n_zero_weight": 0}

    def add(ex: _Example) -> None:
        key = json.dumps([ex.kind, ex.prompt, ex.answers, ex.up], ensure_ascii=False)
        if key in seen:
            counts["n_duplicates"] += 1
            return
        seen.add(key)
        out.append(ex)

    for what, items, names in (
        ("pair", pairs, ("chosen", "rejected")),
        ("tie", ties, ("a", "b")),
        ("thumb", pointwise, ("completion",)),
    ):
        for i, item in enumerate(items or ()):
            prompt = as_messages(_get(item, "prompt", i, what))
            answers = tuple(_get(item, n, i, what) for n in names)
            if not all(isinstance(a, str) for a in answers):
                raise RewardDataError(
                    f"{what} #{i}: answers must be strings, got {[type(a).__name__ for a in answers]}"
                )
            group = _group_of(item, prompt)
            weight, source = _weight_of(item, i, what), _field(item, "voter_source") or ""
            if weight == 0:
                counts["n_zero_weight"] += 1  # a flagged or banned source's vote: not trained on, not evaluated on
                continue
            if what == "thumb":
                label = _get(item, "label", i, what)
                if label not in (True, False, 0, 1):
                    raise RewardDataError(f"thumb #{i}: label must be True (up) or False (down), got {label!r}")
                add(_Example(POINT, prompt, answers, group, up=bool(label), weight=weight, source=source))
            elif answers[0] == answers[1]:
                counts["n_identical_dropped"] += 1  # the same text on both sides says nothing about preference
            else:
                add(_Example(PAIR if what == "pair" else TIE, prompt, answers, group, weight=weight, source=source))
    kinds = [e.kind for e in out]
    if PAIR not in kinds and POINT not in kinds:
        given = f"{len(list(pairs or ()))} pairs, {len(list(ties or ()))} ties, {len(list(pointwise or ()))} thumbs"
        if TIE in kinds:
            raise RewardDataError(
                f"Only ties were given ({given}): ties say two answers are equally good but not which answers are "
                "good. The reward model needs at least one A/B choice or one thumbs-up/down."
            )
        raise RewardDataError(
            f"No usable feedback ({given}; {counts['n_identical_dropped']} pairs had two identical answers). "
            "The reward model needs at least one A/B choice between different answers, or one thumbs-up/down."
        )
    return out, counts


def _split(examples: list[_Example], eval_fraction: float, seed: int) -> tuple[list[_Example], list[_Example]]:
    """Hold out whole conversations, drawn among those with A/B pairs (accuracy needs pairs) when there are any."""
    groups = sorted({e.group for e in examples})
    with_pairs = sorted({e.group for e in examples if e.kind == PAIR})
    pool = with_pairs or groups
    # Keep at least one conversation of the pool for training.
    n_eval = min(math.ceil(eval_fraction * len(pool)), len(pool) - 1) if eval_fraction > 0 else 0
    # Hash with the seed, so the split is stable when new feedback arrives (a conversation stays on its side).
    ranked = sorted(pool, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    held = set(ranked[:n_eval])
    return [e for e in examples if e.group not in held], [e for e in examples if e.group in held]


def split_counts(train: list[_Example], held: list[_Example]) -> dict:
    """How many examples of each kind were trained on and held out."""
    kinds = [e.kind for e in train]
    return {
        "n_train": len(train),
        "n_eval": len(held),
        "n_train_pairs": kinds.count(PAIR),
        "n_train_ties": kinds.count(TIE),
        "n_train_thumbs": kinds.count(POINT),
        "n_eval_pairs": sum(e.kind == PAIR for e in held),
    }


def _length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort within mega-batches of 16 batches, shuffle batches.

    Less padding while keeping randomness, like transformers' LengthGroupedSampler
    (https://github.com/huggingface/transformers/blob/main/src/transformers/trainer_pt_utils.py).
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _micro_batches(batch: list[_Example], max_tokens: int) -> list[list[_Example]]:
    """Consecutive slices of `batch` whose padded size (sequences x longest) stays within max_tokens."""
    out: list[list[_Example]] = [[]]
    for ex in batch:
        trial = [*out[-1], ex]
        if out[-1] and sum(len(e.ids) for e in trial) * max(e.length for e in trial) > max_tokens:
            out.append([ex])
        else:
            out[-1] = trial
    return out


def _lora_config(cfg: Config, base) -> LoraConfig:
    """The reward LoRA: the policy's target modules, on all layers or (reward_lora_layers) only the top N."""
    if cfg.reward_lora_layers <= 0:
        targets = lora_targets(cfg)
    else:
        # PEFT refuses layers_to_transform with "all-linear": list the linear modules of the top layers by name.
        n_layers = base.config.get_text_config().num_hidden_layers
        keep = {str(i) for i in range(max(0, n_layers - cfg.reward_lora_layers), n_layers)}
        wanted = None if cfg.lora_target == "all-linear" else {t.strip() for t in cfg.lora_target.split(",")}
        targets = []
        for name, module in base.named_modules():
            parts = name.split(".")
            if not isinstance(module, torch.nn.Linear) or "layers" not in parts:
                continue
            layer = parts[parts.index("layers") + 1]
            if layer in keep and (wanted is None or parts[-1] in wanted):
                targets.append(name)
        if not targets:
            raise ValueError(f"no linear modules found in the top {cfg.reward_lora_layers} layers for LoRA")
    return LoraConfig(
        r=cfg.reward_lora_r,
        lora_alpha=cfg.reward_lora_alpha,
        lora_dropout=0.0,  # deterministic scores: PPO calls score() on the same answers the fit saw
        target_modules=targets,
        task_type="FEATURE_EXTRACTION",
    )


# --- the model ---------------------------------------------------------------------------------------------
class RewardModel:
    """Scores (conversation, answer) with one float; `fit` learns it from A/B choices, ties and thumbs."""

    def __init__(self, model: PeftModel, head: torch.nn.Linear, tokenizer, cfg: Config):
        self._setup(model, tokenizer, cfg, next(head.parameters()).device)
        self.head = head
        self._backbone = model.get_base_model().get_decoder()  # LoRA layers are injected in place: it sees them

    def _setup(self, model, tokenizer, cfg: Config, device: torch.device) -> None:
        """What every reward model holds: the LM, its tokenizer, settings, device, normalisation, prompt cache."""
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.norm_mean: float | None = None
        self.norm_std: float | None = None
        self._prompt_cache: dict[str, Rendered] = {}

    @classmethod
    def create(cls, cfg: Config, base=None, tokenizer=None) -> RewardModel:
        """A fresh reward model: base/tokenizer from models.load_base(cfg) unless given, a new LoRA and head."""
        if isinstance(base, PeftModel):
            raise ValueError("Pass a plain base model: the reward model adds its own LoRA (this one already has one).")
        if base is None or tokenizer is None:
            base, tokenizer = load_base(cfg)
        prepare_cpu_4bit(base, cfg)
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, _lora_config(cfg, base))
        model.eval()  # no dropout anywhere: scores are deterministic ("N implementation details", #dropout)
        hidden = base.config.get_text_config().hidden_size
        device = next(base.parameters()).device
        head = torch.nn.Linear(hidden, 2 if cfg.reward_length_head else 1, device=device, dtype=torch.float32)
        # Reward head init std 1/sqrt(d_model + 1) (openai/lm-human-preferences; "N implementation details" #reward)
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
        torch.nn.init.zeros_(head.bias)
        return cls(model, head, tokenizer, cfg)

    # --- encoding ----------------------------------------------------------------------------------------
    def encode(self, prompt, answer: str) -> tuple[list[int], str]:
        """Token ids of template(prompt) + answer + end of turn, within reward_max_tokens; (ids, what was cut)."""
        ids, cut, _ = self.encode_parts(prompt, answer)
        return ids, cut

    def encode_parts(self, prompt, answer: str) -> tuple[list[int], str, int]:
        """encode() and how many of the last ids are the answer's (its end-of-turn tokens included)."""
        messages = as_messages(prompt)
        key = json.dumps(messages, ensure_ascii=False)
        whole = self._prompt_cache.get(key)
        if whole is None:
            try:  # the one renderer, with room for every turn: what serving answered from, uncut
                whole = render(self.tokenizer, messages, budget=1 << 30)
            except ValueError as exc:
                raise RewardDataError(str(exc)) from None
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[key] = whole
        answer_part = answer_ids(self.tokenizer, whole, answer)
        budget = self.cfg.reward_max_tokens
        if len(answer_part) >= budget:
            return answer_part[-budget:], "answer", budget  # its end decides how it is judged; the question is lost
        keep = budget - len(answer_part)
        if len(whole.ids) > keep:  # oldest turns dropped as serving drops them (the system prompt stays)
            return render(self.tokenizer, messages, keep).ids + answer_part, "prompt", len(answer_part)
        return whole.ids + answer_part, "", len(answer_part)

    def _encode_examples(self, examples: list[_Example]) -> dict:
        """Fill `ids` of every example; counts of truncations."""
        counts = {"n_prompt_truncated": 0, "n_answer_truncated": 0}
        for ex in examples:
            ex.ids = []
            for answer in ex.answers:
                ids, cut = self.encode(ex.prompt, answer)
                ex.ids.append(ids)
                if cut:
                    counts[f"n_{cut}_truncated"] += 1
        return counts

    # --- forward -----------------------------------------------------------------------------------------
    def _rewards(self, seqs: list[list[int]]) -> torch.Tensor:
        """Raw rewards (N, K) float32 of token sequences, one right-padded forward: K=1, or 2 with the length head."""
        n, t = len(seqs), max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((n, t), pad, dtype=torch.long)  # (N, T)
        mask = torch.zeros((n, t), dtype=torch.long)  # (N, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self._backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (N, T, H)
        last = mask.sum(dim=1) - 1  # (N,) index of the last real token (end of turn)
        h_last = hidden[torch.arange(n, device=self.device), last]  # (N, H)
        return self.head(h_last.float())  # (N, K)

    def _losses(self, batch: list[_Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted loss per example (E,) and quality rewards of all its sequences (S,), one forward for the batch."""
        seqs = [s for ex in batch for s in ex.ids]
        rk = self._rewards(seqs)  # (S, K)
        r = rk.sum(-1)  # (S,) ODIN trains quality + length on the preferences; without the length head K=1
        first, out = 0, []
        for ex in batch:  # E small (batch size): a Python loop over scalars is cheaper than gathering by kind
            if ex.kind == PAIR:
                loss = bt_loss(r[first], r[first + 1])
            elif ex.kind == TIE:
                loss = self.cfg.reward_tie_weight * tie_loss(r[first], r[first + 1])
            else:
                loss = self.cfg.reward_pointwise_weight * pointwise_loss(r[first], torch.tensor(ex.up))
            out.append(ex.weight * loss)
            first += len(ex.ids)
        losses = torch.stack(out)  # (E,)
        if rk.shape[1] == 2 and len(seqs) > 2:  # a batch-level term on every example: the batch mean carries it once
            lengths = torch.tensor([len(a) for ex in batch for a in ex.answers], device=rk.device)  # (S,) chars
            w = self.head.weight  # (2, H)
            term = length_loss(rk[:, 0], rk[:, 1], lengths, w[0], w[1])
            losses = losses + self.cfg.reward_length_weight * term
        return losses, rk[:, 0]  # (E,), (S,)

    def _evaluate(self, examples: list[_Example], batch_size: int) -> tuple[float, float | None]:
        """(mean weighted loss, accuracy on its pairs or None) with no gradients."""
        losses, right, n_pairs = [], 0.0, 0
        with torch.no_grad():
            for idx in _length_batches([e.length for e in examples], batch_size, random.Random(0)):
                batch = [examples[i] for i in idx]
                loss, r = self._losses(batch)
                losses += loss.tolist()
                first = 0
                for ex in batch:
                    if ex.kind == PAIR:
                        n_pairs += 1
                        right += float(r[first] > r[first + 1]) + 0.5 * float(r[first] == r[first + 1])
                    first += len(ex.ids)
        return sum(losses) / len(losses), (right / n_pairs if n_pairs else None)

    # --- training ----------------------------------------------------------------------------------------
    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())

    def _state(self) -> dict[str, torch.Tensor]:
        params = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        return {k: v.detach().clone() for k, v in params.items()}

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        params = {f"model.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def fit(
        self,
        pairs: Iterable = (),
        *,
        ties: Iterable = (),
        pointwise: Iterable = (),
        eval_fraction: float = 0.1,
        progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Train on A/B pairs, ties and thumbs; metrics of the held-out part (split by conversation).

        `progress(info)` is called after every step with {step, steps, ...} (and eval results when there were some);
        it may block, e.g. to let serving go first.
        """
        start = time.time()
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        examples, counts = _collect(list(pairs or ()), list(ties or ()), list(pointwise or ()))
        train, held = _split(examples, eval_fraction, self.cfg.seed)
        metrics = self._fit(examples, train, held, counts, eval_fraction, progress or (lambda info: None))
        return {**metrics, **split_counts(train, held), **counts, "seconds": round(time.time() - start, 2)}

    def _fit(self, examples, train, held, counts: dict, eval_fraction: float, progress) -> dict:
        """The LoRA reward model's training loop (continuing from the current weights), with early stopping."""
        cfg = self.cfg
        counts.update(self._encode_examples(examples))
        warning = ""
        if eval_fraction > 0 and not held:
            n_groups = len({e.group for e in examples})
            warning = (
                f"Only {len(examples)} usable example(s) from {n_groups} conversation(s): nothing could be held out, "
                "so held-out loss and accuracy are not measured (None) and there is no early stopping."
            )

        rng = random.Random(cfg.seed)
        bs = max(1, cfg.reward_batch_size)
        steps_per_epoch = math.ceil(len(train) / bs)
        total = steps_per_epoch * max(1, cfg.reward_epochs)
        eval_every = max(1, math.ceil(steps_per_epoch / EVALS_PER_EPOCH))
        warmup = max(1, round(0.1 * total))
        opt = torch.optim.AdamW(self._trainable(), lr=cfg.reward_lr, weight_decay=0.0)
        # Linear warm-up then linear decay to 0 (the schedule of transformers' get_linear_schedule_with_warmup).
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
        )

        history: list[dict] = []
        best = {"eval_loss": math.inf, "state": None, "step": 0, "train_loss": None, "accuracy": None}
        interval: list[float] = []
        first_interval_loss = None
        step, bad_evals, stopped_early = 0, 0, False
        for _ in range(max(1, cfg.reward_epochs)):
            for idx in _length_batches([e.length for e in train], bs, rng):
                batch = [train[i] for i in idx]
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                # Gradient accumulation over micro-batches: each example's loss needs only its own sequences, so
                # the sum is exact, and activation memory stays bounded (8 pairs x 512 tokens took ~20 GB at once).
                for micro in _micro_batches(batch, MAX_TOKENS_PER_FORWARD):
                    part = self._losses(micro)[0].sum() / len(batch)
                    part.backward()
                    loss += part.detach()
                torch.nn.utils.clip_grad_norm_(self._trainable(), 1.0)
                opt.step()
                sched.step()
                step += 1
                interval.append(loss.item())
                info = {"step": step, "steps": total, "epoch": round(step / steps_per_epoch, 3), "loss": interval[-1]}
                if step % eval_every == 0 or step == total or step % steps_per_epoch == 0:
                    train_loss = sum(interval) / len(interval)
                    first_interval_loss = train_loss if first_interval_loss is None else first_interval_loss
                    interval = []
                    point = {"step": step, "epoch": round(step / steps_per_epoch, 3), "train_loss": train_loss}
                    if held:
                        eval_loss, acc = self._evaluate(held, bs)
                        point.update(eval_loss=eval_loss, accuracy=acc)
                        if eval_loss < best["eval_loss"]:
                            best.update(eval_loss=eval_loss, state=self._state(), step=step, accuracy=acc)
                            best["train_loss"], bad_evals = train_loss, 0
                        else:
                            bad_evals += 1
                    else:
                        best.update(step=step, train_loss=train_loss)
                    history.append(point)
                    info.update(point)
                    stopped_early = bool(held) and bad_evals >= cfg.reward_patience
                if progress is not None:
                    progress(info)
                if stopped_early:
                    break
            if stopped_early:
                break
        if best["state"] is not None and best["step"] != step:
            self._restore(best["state"])
        self.model.eval()

        sample = [(e.prompt, a) for e in train for a in e.answers]
        random.Random(cfg.seed).shuffle(sample)
        sample = sample[: cfg.reward_norm_samples]
        norm = self.set_normalisation([p for p, _ in sample], [a for _, a in sample])
        return {
            "train_loss": best["train_loss"],
            "train_loss_first": first_interval_loss,
            "eval_loss": best["eval_loss"] if held else None,
            "accuracy": best["accuracy"] if held else None,
            "epochs": round(step / steps_per_epoch, 3),
            "steps": step,
            "best_step": best["step"],
            "stopped_early": stopped_early,
            "norm_mean": norm["mean"],
            "norm_std": norm["std"],
            "history": history,
            "warning": warning,
        }

    # --- inference ---------------------------------------------------------------------------------------
    def _score_ids(self, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
        """Raw rewards (N,) in the given order, computed in batches sorted by length."""
        out = torch.empty(len(seqs), dtype=torch.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                out[idx] = self._rewards([seqs[i] for i in idx])[:, 0].float().cpu()  # the quality head only
        return out

    def _raw_scores(self, prompts: list[list[dict]], answers: list[str], batch_size: int) -> torch.Tensor:
        """Unnormalised rewards (B,) of non-empty inputs."""
        return self._score_ids([self.encode(p, a)[0] for p, a in zip(prompts, answers)], batch_size)

    def score(
        self, prompts: list[list[dict]], answers: list[str], *, normalise: bool = False, batch_size: int = 8
    ) -> torch.Tensor:
        """Reward (B,) float32 on CPU of each answer to its conversation; normalised to the stored mean/std if asked."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers: one answer per prompt")
        if not answers:
            return torch.empty(0, dtype=torch.float32)
        r = self._raw_scores(prompts, answers, batch_size)
        if normalise:
            if self.norm_mean is None or self.norm_std is None:
                raise RuntimeError("No normalisation statistics: call fit() or set_normalisation() first.")
            r = (r - self.norm_mean) / self.norm_std
        return r

    def prob_better(self, prompts: list[list[dict]], a: list[str], b: list[str]) -> torch.Tensor:
        """P(a beats b) (N,) by Bradley-Terry on the scores (a point estimate: no uncertainty)."""
        return torch.sigmoid(self.score(prompts, a) - self.score(prompts, b))

    def pick_pair(self, prompt: list[dict], answers: list[str], rng: random.Random) -> tuple[int, int]:
        """Which two of several sampled answers to show in Compare: here two at random, non-blank where possible."""
        ok = [i for i, a in enumerate(answers) if a.split()]
        ok = ok if len(ok) >= 2 else list(range(len(answers)))
        i, j = rng.sample(ok, 2)
        return i, j

    def accuracy(self, pairs: Iterable, batch_size: int = 8) -> float:
        """Fraction of pairs where the chosen answer scores higher (a tie counts half)."""
        pairs = list(pairs)
        if not pairs:
            raise RewardDataError("accuracy() needs at least one pair.")
        prompts = [as_messages(_get(p, "prompt", i, "pair")) for i, p in enumerate(pairs)]
        chosen = [_get(p, "chosen", i, "pair") for i, p in enumerate(pairs)]
        rejected = [_get(p, "rejected", i, "pair") for i, p in enumerate(pairs)]
        r = self.score(prompts + prompts, chosen + rejected, batch_size=batch_size)
        rc, rr = r[: len(pairs)], r[len(pairs) :]
        return ((rc > rr).float() + 0.5 * (rc == rr).float()).mean().item()

    def set_normalisation(self, prompts: list[list[dict]], answers: list[str]) -> dict:
        """Store mean/std of raw scores of these answers (e.g. reference-policy samples) for score(normalise=True)."""
        if not answers:
            raise RewardDataError("set_normalisation() needs at least one answer.")
        r = self.score(prompts, answers)
        std = r.std().item() if len(r) > 1 else 0.0
        self.norm_mean = r.mean().item()
        self.norm_std = std if std > 1e-6 else 1.0  # one answer, or all equal: centre only
        return {"mean": self.norm_mean, "std": self.norm_std, "n": len(r)}

    # --- files -------------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write PEFT's adapter files + head + meta into `folder` (written beside it, then renamed into place)."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_FILE))
        meta = {
            "format": 1,
            "hidden_size": self.head.in_features,
            "length_head": self.head.out_features == 2,
            "norm_mean": self.norm_mean,
            "norm_std": self.norm_std,
            "max_tokens": self.cfg.reward_max_tokens,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder

    @classmethod
    def load(cls, cfg: Config, folder: str | Path, base=None, tokenizer=None) -> RewardModel:
        """A reward model saved by save(); trainable again (fit continues from it)."""
        folder = Path(folder)
        missing = [n for n in ("adapter_config.json", HEAD_FILE, META_FILE) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a saved reward model: {', '.join(missing)} missing.")
        meta = json.loads((folder / META_FILE).read_text())
        if base is None or tokenizer is None:
            base, tokenizer = load_base(cfg)
        hidden = base.config.get_text_config().hidden_size
        if meta["hidden_size"] != hidden:
            raise ValueError(
                f"The reward model in {folder} was trained on a base with hidden size {meta['hidden_size']}, "
                f"this base has {hidden}: use the same --model."
            )
        prepare_cpu_4bit(base, cfg)
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
        device = next(base.parameters()).device
        head = torch.nn.Linear(hidden, 2 if meta.get("length_head") else 1, device=device, dtype=torch.float32)
        head.load_state_dict({k: v.to(device) for k, v in load_file(str(folder / HEAD_FILE)).items()})
        rm = cls(model, head, tokenizer, cfg)
        rm.norm_mean, rm.norm_std = meta.get("norm_mean"), meta.get("norm_std")
        return rm


# --- evaluation on files (the CLI's reward-eval) -----------------------------------------------------------
def _length_accuracy(pairs: Sequence) -> float:
    """Accuracy of 'the longer answer wins' (characters; equal length counts half)."""
    right = [
        1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0 for p in pairs
    ]
    return sum(right) / len(right) if right else float("nan")


SIMILAR_LENGTH = 0.2
"""Pairs whose answers differ by at most this fraction of the longer one count as 'similar length'."""


def _similar_length(pairs: Sequence) -> list[bool]:
    """For each pair: do its answers differ by at most SIMILAR_LENGTH of the longer one (in characters)?"""
    return [abs(len(p.chosen) - len(p.rejected)) <= SIMILAR_LENGTH * max(len(p.chosen), len(p.rejected)) for p in pairs]


def length_baselines(pairs: Sequence) -> dict:
    """What the length rule ('the longer answer wins') scores on these pairs, and the sizes of the length subsets."""
    similar = [p for p, s in zip(pairs, _similar_length(pairs), strict=True) if s]
    return {
        "n_shorter_chosen": sum(len(p.chosen) < len(p.rejected) for p in pairs),
        "n_similar_length": len(similar),
        "length_baseline": _length_accuracy(pairs),
        "similar_length_baseline": _length_accuracy(similar) if similar else None,
    }


def accuracy_by_length(r_chosen: torch.Tensor, r_rejected: torch.Tensor, pairs: Sequence) -> dict:
    """Accuracy overall and split by length, to show what is learned beyond 'longer is better'.

    On pairs where the chosen answer is the shorter one the length rule scores 0; on similar-length pairs it has
    little to go on. Ties in reward count half. Subsets that are empty give None.
    """
    right = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()  # (N,)
    lc = torch.tensor([len(p.chosen) for p in pairs], dtype=torch.float)  # (N,)
    lr = torch.tensor([len(p.rejected) for p in pairs], dtype=torch.float)  # (N,)
    similar = torch.tensor(_similar_length(pairs), dtype=torch.bool)  # (N,)

    def mean(mask: torch.Tensor) -> float | None:
        return right[mask].mean().item() if mask.any() else None

    return {
        "accuracy": right.mean().item(),
        "shorter_chosen_accuracy": mean(lc < lr),
        "longer_chosen_accuracy": mean(lc > lr),
        "similar_length_accuracy": mean(similar),
        **length_baselines(pairs),
    }


def reward_eval(
    cfg: Config, train: str, tests: list[str], limit_train: int | None = None, limit_test: int | None = None
) -> dict:
    """Fit on the first `limit_train` pairs of `train`, report held-out accuracy on each test file.

    When a test file is the train file, its test pairs are the last `limit_test` ones not used for training.
    Also reports the length-only baseline and the accuracy on pairs where the chosen answer is the shorter one.
    """
    from rlhf_live.store.formats import (
        read_pairs,  # pure-Python file parsing; imported here to keep module import light
    )

    start = time.time()
    train_all = list(read_pairs(train))
    train_pairs = train_all[:limit_train] if limit_train else train_all
    if not tests:
        raise RewardDataError("reward-eval needs at least one --test file.")
    test_sets: dict[str, list] = {}
    for path in tests:
        if Path(path).resolve() == Path(train).resolve():
            pool = train_all[len(train_pairs) :]
            test_sets[path] = pool[-limit_test:] if limit_test else pool
        else:
            pool = list(read_pairs(path))
            test_sets[path] = pool[:limit_test] if limit_test else pool
        if not test_sets[path]:
            raise RewardDataError(f"No test pairs in {path} (all of them are used for training?).")

    rm = RewardModel.create(cfg)
    fit = rm.fit(train_pairs)
    fit.pop("history", None)
    by_length, seconds_by_file = {}, {}
    for path, pairs in test_sets.items():
        t0 = time.time()
        prompts = [p.prompt for p in pairs]
        r = rm.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        by_length[path] = accuracy_by_length(r[: len(pairs)], r[len(pairs) :], pairs)
        seconds_by_file[path] = round(time.time() - t0, 2)
    first = tests[0]
    return {
        "accuracy": by_length[first]["accuracy"],
        "accuracy_by_file": {p: d["accuracy"] for p, d in by_length.items()},
        "length_baseline_by_file": {p: d["length_baseline"] for p, d in by_length.items()},
        "shorter_chosen_accuracy_by_file": {p: d["shorter_chosen_accuracy"] for p, d in by_length.items()},
        "by_length_by_file": by_length,
        "n_train": len(train_pairs),
        "n_test": len(test_sets[first]),
        "n_test_by_file": {p: len(v) for p, v in test_sets.items()},
        "fit": fit,
        "fit_seconds": fit["seconds"],
        "test_seconds_by_file": seconds_by_file,
        "seconds": round(time.time() - start, 2),
    }
