"""Who makes a request, and how often they may: salted voter and source ids, per-minute limits.

Knows sessions, accounts and addresses only as salted ids (raw keys and addresses are never stored) and the sliding
one-minute windows of the limits; knows nothing of models, SQL or Gradio.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from rlhf_live.config import Config
from rlhf_live.serving.settings import TooManyRequests
from rlhf_live.store import source_id, voter_id


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the voter (whose conversations), the source (whose influence) and whether signed in."""

    voter: str
    """Salted id of the browser, API session or signed-in account: owns conversations and votes."""
    source: str = ""
    """Salted id of the signed-in account, else of the network address: what limits and round budgets count."""
    signed_in: bool = False
    """A Hugging Face sign-in stands behind the request (Config.vote_requires_login)."""


def _caller(voter: str | Caller) -> Caller:
    return voter if isinstance(voter, Caller) else Caller(voter)


def as_caller(voter: str | Caller) -> Caller:
    """A Caller from a bare voter id (simulations and tests pass those)."""
    return voter if isinstance(voter, Caller) else Caller(voter)


class Callers:
    """Salted ids for requests and the per-minute limits per voter and, on a public deployment, per source."""

    def __init__(self, salt: str, cfg: Config):
        self._salt, self.cfg = salt, cfg
        self._recent: dict[str, collections.deque] = {}  # voter or source -> times of its requests in the last minute
        self._recent_lock = threading.Lock()

    def voter(self, session_key: str, username: str | None = None) -> str:
        """Salted id of a browser session or logged-in user; the raw key is never stored."""
        return voter_id(session_key, username, self._salt)

    def caller(self, session_key: str, address: str = "", username: str | None = None) -> Caller:
        """The Caller behind a request: salted voter and source ids (raw keys and addresses are never stored)."""
        return Caller(
            voter_id(session_key, username, self._salt),
            source_id(address, username, self._salt),
            signed_in=bool(username),
        )

    def limit(self, who: str | Caller) -> None:
        """Refuse a request past the per-minute limits: per voter, and on a public deployment per source too."""
        who = as_caller(who)
        self._limit_key(who.voter, self.cfg.max_requests_per_minute, "")
        if self.cfg.public and who.source:
            # Fresh sessions are free to mint; addresses and accounts are not: one person with many tabs shares this.
            self._limit_key(who.source, self.cfg.max_source_requests_per_minute, " from your address or account")

    def _limit_key(self, key: str, limit: int, whose: str) -> None:
        """One sliding-minute limit (0 = no limit) on `key`."""
        if limit <= 0:
            return
        now = time.monotonic()
        with self._recent_lock:
            times = self._recent.setdefault(key, collections.deque())
            while times and now - times[0] > 60:
                times.popleft()
            if len(times) >= limit:
                wait = 60 - (now - times[0])
                raise TooManyRequests(f"Too many requests{whose}: at most {limit} a minute. Please wait {wait:.0f} s.")
            times.append(now)
            if len(self._recent) > 10_000:  # forget voters idle for a minute, so the map stays small
                self._recent = {v: t for v, t in self._recent.items() if t and now - t[-1] <= 60}
