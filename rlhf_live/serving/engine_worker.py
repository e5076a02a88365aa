"""The llama.cpp process: one xllamacpp server on one GGUF, answering JSON-line requests on stdin with lines on stdout.

Knows xllamacpp and its reply format; knows nothing of chat templates, versions or the app. Runs as
`python -m rlhf_live.serving.engine_worker` (started by `llamacpp._Server`) so that llama.cpp's OpenMP threads live in a
process where torch never ran: libgomp counts every OpenMP thread of a process, and once torch's own pool exists the
count passes the 2 cores and every barrier of llama.cpp's hundreds per token sleeps instead of spinning (decode speed
in one process: bench/RESULTS.md ## Serving engine; https://gcc.gnu.org/onlinedocs/libgomp/GOMP_005fSPINCOUNT.html).

Protocol, one JSON object per line. In: the first line is the server's settings; then
{"id", "op": "complete", "body"} (a llama.cpp completion request) or {"id", "op": "cancel"}. Out: {"ready": true} or
{"error"} once, then per request {"id", "tok": token id} while streaming, {"id", "finish", "cached"},
{"id", "reply"} for a request that does not stream, {"id", "error"} and finally {"id", "done": true}.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading


def _start_server(settings: dict):
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = settings["model"]
    p.n_parallel = settings["parallel"]
    p.n_ctx = settings["n_ctx"] * settings["parallel"]  # split evenly: every slot holds a whole context
    p.cpuparams.n_threads = settings["threads"]
    p.cpuparams_batch.n_threads = settings["threads"]
    p.cache_ram_mib = settings["cache_mib"]  # earlier prompts' KV in host memory, beyond the slots
    # Flash attention off: on 2 CPU cores it decoded 136 vs 128 tok/s at a short context and 100 vs 73 after 1,100
    # tokens, and a next turn's 50 new tokens took 122 vs 178 ms; only a cold 1,000-token prefill was faster with it
    # (1.6 vs 2.0 s), and a chat's next turn reuses its cache instead.
    p.flash_attn_type = settings.get("flash_attn", 0)
    if settings.get("ubatch"):  # tokens per prefill step (llama.cpp's default 512)
        p.n_ubatch = p.n_batch = settings["ubatch"]
    p.warmup = False
    p.verbosity = -1
    # The embedded server also listens on loopback HTTP; a random key keeps other local processes out.
    p.api_keys = [secrets.token_hex(16)]
    # Loaded at scale 0: every request names its own adapter (https://github.com/xorbitsai/xllamacpp#lora).
    p.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(path, 0.0) for path in settings["adapters"]]
    return xllamacpp.Server(p)


class _Out:
    """stdout shared by every request's thread: one whole line at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def send(self, **message) -> None:
        line = json.dumps(message) + "\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()


def _complete(server, rid: int, body: dict, cancels: dict[int, threading.Event], out: _Out) -> None:
    """Run one request; stream token ids (or send the whole reply), then `done`."""
    cancel = cancels[rid]

    def on_chunk(chunk: dict) -> bool:
        choice = (chunk.get("choices") or [{}])[0]
        for item in (choice.get("logprobs") or {}).get("content") or []:
            out.send(id=rid, tok=item["id"])
        if choice.get("finish_reason"):
            cached = ((chunk.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            out.send(id=rid, finish=choice["finish_reason"], cached=cached)
        return cancel.is_set()  # True stops this request at the next token

    try:
        if body.get("stream"):
            server.handle_completions(body, on_chunk)
        else:
            out.send(id=rid, reply=server.handle_completions(body))
    except BaseException as exc:  # the parent turns it into EngineError
        out.send(id=rid, error=str(exc) or type(exc).__name__)
    finally:
        cancels.pop(rid, None)
        out.send(id=rid, done=True)


def main() -> None:
    """Serve requests from stdin until it closes."""
    out = _Out()
    settings = json.loads(sys.stdin.readline())
    try:
        server = _start_server(settings)
    except Exception as exc:  # a corrupt or foreign file: the parent reports it and keeps what it served
        out.send(error=str(exc) or type(exc).__name__)
        return
    out.send(ready=True)
    cancels: dict[int, threading.Event] = {}
    for line in sys.stdin:
        message = json.loads(line)
        rid = message["id"]
        if message["op"] == "cancel":
            if rid in cancels:
                cancels[rid].set()
            continue
        cancels[rid] = threading.Event()
        threading.Thread(target=_complete, args=(server, rid, message["body"], cancels, out), daemon=True).start()
    # stdin closed: the parent is gone or dropped this server. Skip interpreter shutdown, where llama.cpp's threads
    # would be destroyed while running ("terminate called without an active exception").
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
