"""Preference-pair file formats: TRL preference rows, Anthropic HH transcripts, OpenAssistant trees.

Knows how to turn lines of .jsonl / .jsonl.gz into `Pair`s of chat messages; knows nothing of SQL or tensors.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HH_ASSISTANT = "\n\nAssistant: "
Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class FormatError(ValueError):
    """A line of an input file is not a preference pair; carries the 1-based line number."""

    def __init__(self, path: str | Path, line: int, reason: str):
        super().__init__(f"{path}, line {line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass
class Pair:
    """Two answers to one conversation: `chosen` preferred by a person over `rejected`."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = ""
    line: int = 0
    meta: dict = field(default_factory=dict)


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def split_hh(transcript: str) -> list[Message]:
    """'\\n\\nHuman: ..\\n\\nAssistant: ..' -> chat messages (text kept exactly, speaker tags removed)."""
    roles = {"Human": "user", "Assistant": "assistant"}
    messages: list[Message] = []
    rest = transcript
    if not rest.startswith("\n\nHuman: "):
        raise ValueError("an HH transcript starts with '\\n\\nHuman: '")
    while rest:
        speaker = "Human" if rest.startswith("\n\nHuman: ") else "Assistant"
        rest = rest[len(f"\n\n{speaker}: ") :]
        cuts = [i for i in (rest.find("\n\nHuman: "), rest.find("\n\nAssistant: ")) if i >= 0]
        end = min(cuts) if cuts else len(rest)
        messages.append({"role": roles[speaker], "content": rest[:end]})
        rest = rest[end:]
        if rest and not rest.startswith(("\n\nHuman: ", "\n\nAssistant: ")):
            raise ValueError("transcript has text outside Human/Assistant turns")
    return messages


def _as_messages(value, what: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if what == "prompt" else [{"role": "assistant", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"'{what}' must be a string or a list of {{role, content}} messages")


def _answer_text(messages: list[Message], what: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"'{what}' must be one assistant message")
    return messages[0]["content"]


def parse_row(row: dict) -> Pair:
    """One JSON object in TRL preference format or Anthropic HH format -> Pair."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError("expected an object with 'chosen' and 'rejected'")
    if "prompt" in row:  # TRL explicit-prompt preference format
        prompt = _as_messages(row["prompt"], "prompt")
        chosen = _answer_text(_as_messages(row["chosen"], "chosen"), "chosen")
        rejected = _answer_text(_as_messages(row["rejected"], "rejected"), "rejected")
        return Pair(prompt, chosen, rejected)
    chosen_t, rejected_t = row["chosen"], row["rejected"]
    if isinstance(chosen_t, str) and isinstance(rejected_t, str):  # Anthropic HH transcripts
        # The prompt is everything before the last Assistant turn the two transcripts share; an answer may
        # itself contain "\n\nHuman:"-like text, so split at the shared prefix, not at every tag.
        shared = os.path.commonprefix([chosen_t, rejected_t])
        cut = shared.rfind(HH_ASSISTANT)
        if cut < 0:
            raise ValueError("the transcripts share no Assistant turn to answer")
        prompt = split_hh(chosen_t[:cut])
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError("the conversation has no Human turn before the answer")
        start = cut + len(HH_ASSISTANT)
        return Pair(prompt, chosen_t[start:], rejected_t[start:])
    # TRL implicit-prompt format: two full conversations
    chosen_m, rejected_m = _as_messages(chosen_t, "chosen"), _as_messages(rejected_t, "rejected")
    for msgs, what in ((chosen_m, "chosen"), (rejected_m, "rejected")):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ValueError(f"'{what}' must end with an assistant turn")
    prompt = chosen_m[:-1]
    if rejected_m[:-1] != prompt:
        raise ValueError("'chosen' and 'rejected' do not share the same conversation before the last answer")
    if not prompt:
        raise ValueError("the conversation has no turn before the answer")
    return Pair(prompt, chosen_m[-1]["content"], rejected_m[-1]["content"])


def _oasst_pairs(tree: dict) -> Iterator[Pair]:
    """Sibling assistant replies ranked by OpenAssistant raters: each better-ranked one beats each worse one."""

    def walk(node: dict, context: list[Message]) -> Iterator[Pair]:
        role = "user" if node["role"] == "prompter" else "assistant"
        here = [*context, {"role": role, "content": node["text"]}]
        replies = [r for r in node.get("replies", []) if not r.get("deleted")]
        if role == "user":
            ranked = sorted((r for r in replies if r.get("rank") is not None), key=lambda r: r["rank"])
            for better, worse in itertools.combinations(ranked, 2):
                if better["rank"] < worse["rank"]:
                    yield Pair(list(here), better["text"], worse["text"])
        for reply in replies:
            yield from walk(reply, here)

    yield from walk(tree["prompt"], [])


def read_pairs(path: str | Path, *, strict: bool = True) -> Iterator[Pair]:
    """Yield every Pair in a .jsonl/.jsonl.gz file (TRL, HH, or OASST trees); FormatError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such file: {path}")
    with _open_text(path) as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if isinstance(row, dict) and "message_tree_id" in row and "prompt" in row:
                    for pair in _oasst_pairs(row):
                        pair.source, pair.line = str(path), number
                        yield pair
                    continue
                pair = parse_row(row)
            except (ValueError, KeyError, TypeError) as exc:
                if strict:
                    raise FormatError(path, number, str(exc)) from None
                continue
            pair.source, pair.line = str(path), number
            yield pair
