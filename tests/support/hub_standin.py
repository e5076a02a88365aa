"""A local stand-in of the Hugging Face Hub's HTTP API (the subset huggingface_hub's uploads and downloads use).

Keeps repos in memory and records every call, so tests can point HF_ENDPOINT here and run the real call path.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    """The stand-in server: `repos[(type, repo_id)] = {path: bytes}`, `calls` = [(method, path)]."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict[str, bytes]] = {}
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw

            def _send(self, code: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
                body = raw if raw is not None else json.dumps({} if payload is None else payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_POST(self):
                hub.calls.append(("POST", self.path))
                body = self._body()
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    kind = req.get("type") or "model"
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if (kind, repo) in hub.repos:
                        url = f"{hub.url}/{'' if kind == 'model' else 'datasets/'}{repo}"
                        return self._send(409, {"error": "You already created this repo", "url": url})
                    hub.repos[(kind, repo)] = {}
                    prefix = "" if kind == "model" else f"{kind}s/"
                    return self._send(200, {"url": f"{hub.url}/{prefix}{repo}", "name": repo})
                m = re.match(r"^/api/(model|dataset)s/([^/]+/[^/]+)/(preupload|commit)/(\w+)", self.path)
                if not m or (m[1], m[2]) not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                files = hub.repos[(m[1], m[2])]
                if m[3] == "preupload":
                    paths = [f["path"] for f in json.loads(body)["files"]]
                    return self._send(
                        200, {"files": [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]}
                    )
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return self._send(
                    200,
                    {
                        "commitUrl": f"{hub.url}/{hub.prefix(m[1])}{m[2]}/commit/{hub.sha(m[1], m[2])}",
                        "commitOid": hub.sha(m[1], m[2]),
                        "success": True,
                    },
                )

            def do_GET(self):
                self._get()

            def do_HEAD(self):
                self._get()

            def _get(self):
                hub.calls.append((self.command, self.path))
                path = self.path.split("?")[0]
                m = re.match(r"^/api/(model|dataset)s/([^/]+/[^/]+)(?:/revision/\w+)?$", path)
                if m:
                    files = hub.repos.get((m[1], m[2]))
                    if files is None:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    return self._send(
                        200, {"id": m[2], "sha": hub.sha(m[1], m[2]), "siblings": siblings, "private": True}
                    )
                m = re.match(r"^/api/(model|dataset)s/([^/]+/[^/]+)/tree/\w+$", path)
                if m:  # snapshot_download lists the files with this (recursive)
                    files = hub.repos.get((m[1], m[2]), {})
                    entries = [
                        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(files.items())
                    ]
                    return self._send(200, entries)
                m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/\w+/(.+)$", path)
                kind = "dataset" if m and m[1] else "model"
                files = hub.repos.get((kind, m[2])) if m else None
                if files is None or m[3] not in files:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = files[m[3]]
                headers = {"X-Repo-Commit": hub.sha(kind, m[2]), "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
                return self._send(200, headers=headers, raw=data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def prefix(kind: str) -> str:
        """URL prefix of a repo type: '' for models, 'datasets/' for datasets."""
        return "" if kind == "model" else f"{kind}s/"

    def sha(self, kind: str, repo: str) -> str:
        """A commit id that changes with the repo's content."""
        files = self.repos.get((kind, repo), {})
        return hashlib.sha1(
            json.dumps({p: hashlib.sha1(d).hexdigest() for p, d in sorted(files.items())}).encode()
        ).hexdigest()

    def close(self) -> None:
        self.server.shutdown()
