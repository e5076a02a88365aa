"""The feedback store: conversations, answers, thumbs, A/B choices, adapter versions and training runs in SQLite.

Knows SQL, not tensors: it records what people (and importers) said about answers and hands out training rows
(`preference_pairs`, `ties`, `pointwise_labels`, `prompts`) after a watermark; it knows nothing of models, tokens,
Gradio or how the rows are used. It never imports torch or gradio. `Store` is the one object callers hold; each
concern lives in its own module:

| module | tables | verbs |
|---|---|---|
| base.py | (connections) | one connection per thread, `_write`/`_read` transactions, validation, `voter_salt` |
| conversations.py | conversations, messages | `new_conversation`, `add_message`, `conversation`, `context` |
| votes.py | feedback, feedback_events, comparisons | `record_feedback`, `new_comparison`, `choose` |
| training_rows.py | (reads all of them) | `watermark`, `preference_pairs`, `ties`, `pointwise_labels`, `prompts` |
| versions.py | adapters, training_runs | `add_adapter`, `set_adapter_status`, `live_adapter`, `start_run` |
| transfer.py | (all) | `export`, `import_pairs`, `stats` |
| openwebui.py | conversations, messages, feedback, comparisons | `import_openwebui` (Open WebUI's rating export) |
| people.py | (all, one voter's rows) | `voter_data` ("download my data"), `delete_voter` ("delete my data") |
| sources.py | sources | `flag_source`, `set_source_status`, `source_statuses` (flagged, banned, cleared) |

Guarantees:
- One `sqlite_utils.Database` per thread (SQLite connections are bound to their creating thread), WAL mode so readers
  never block the writer, `synchronous=FULL` by default so an acknowledged write survives a crash or power cut.
- Every write method is one `BEGIN IMMEDIATE` transaction: it either happens entirely or not at all, and it validates
  its input first, so bad input raises a `StoreError` with a sentence a person understands and changes nothing.
- `feedback` holds one row per (answer, voter) with the final state (up / down / cleared); the full change history is
  kept in `feedback_events` (one row per write).
- No raw IP address or browser hash is stored: callers pass `voter_id(...)` and `source_id(...)`,
  salted hashes.
"""

from __future__ import annotations

from rlhf_live.store.base import (
    ADAPTER_STATUSES,
    CHOICES,
    EXPORT_FORMATS,
    IMPORT_VOTER,
    ROLES,
    VOTE_VALUES,
    AlreadyVoted,
    Forbidden,
    InvalidInput,
    StoreError,
    UnknownId,
    source_id,
    voter_id,
)
from rlhf_live.store.conversations import Conversations, MessageTree
from rlhf_live.store.openwebui import OpenWebUI
from rlhf_live.store.people import People
from rlhf_live.store.sources import SOURCE_STATUSES, Sources
from rlhf_live.store.transfer import Transfer
from rlhf_live.store.votes import Votes

__all__ = [
    "ADAPTER_STATUSES",
    "CHOICES",
    "EXPORT_FORMATS",
    "IMPORT_VOTER",
    "ROLES",
    "SOURCE_STATUSES",
    "VOTE_VALUES",
    "AlreadyVoted",
    "Forbidden",
    "InvalidInput",
    "MessageTree",
    "Store",
    "StoreError",
    "UnknownId",
    "source_id",
    "voter_id",
]


class Store(Conversations, Votes, Transfer, People, Sources, OpenWebUI):
    """The SQLite feedback DB; safe to share between threads (each thread gets its own connection)."""
