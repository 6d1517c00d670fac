"""A Hugging Face hub on localhost, for the online path of `pull` (HF_ENDPOINT=its url): the three requests
huggingface_hub makes for a GGUF pair, answered as huggingface.co answers them (plain HTTP, no Xet).

- GET  /api/models/<repo>/revision/<rev>?blobs=true   model_info(files_metadata=True): sha and siblings with sizes
- HEAD /<repo>/resolve/<rev>/<file>                    X-Repo-Commit, ETag (the sha256), Content-Length
- GET  /<repo>/resolve/<rev>/<file>                    the bytes (with Range)

`cut_after` makes the server drop the connection after that many bytes of a file, once per file: an
interrupted transfer that huggingface_hub's retry resumes with a Range request. `stall_after` makes it hang
there instead, for a test that kills the client mid-download.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "5" * 40
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # what model_info says, where it lies


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    url: str = ""
    cut_after: int | None = None
    stall_after: int | None = None  # send that many bytes of a file's first GET, then hang until `release`
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[str] = field(default_factory=list)
    _cut_done: set[str] = field(default_factory=set)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            ranged = f" {self.headers['Range']}" if self.headers.get("Range") else ""
            hub.requests.append(f"{self.command} {path}{ranged}")
            if path.startswith("/api/models/"):
                return self._model_info(path.removeprefix("/api/models/"))
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            repo = hub.repos.get(repo_id)
            _revision, _, name = rest.partition("/")
            if repo is None or name not in repo.files:
                return self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if not body:
                return self._send(200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
            start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").split("-")[0] or 0)
            part = data[start:]
            cut = hub.cut_after if hub.cut_after is not None else hub.stall_after
            if cut is not None and name not in hub._cut_done and start == 0:
                hub._cut_done.add(name)
                self.send_response(200)
                for key, value in {**headers, "Content-Length": str(len(part))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(part[:cut])
                self.wfile.flush()
                if hub.stall_after is not None:
                    hub.release.wait(120)
                self.close_connection = True
                return None
            status = 206 if start else 200
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
            return self._send(status, part, {**headers, **extra})

        def _model_info(self, rest: str) -> None:
            repo_id, _, _revision = rest.partition("/revision/")
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": name, "size": repo.claimed_sizes.get(name, len(data)),
                         "blobId": hashlib.sha1(data).hexdigest(),
                         "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                 "pointerSize": 134}}
                        for name, data in sorted(repo.files.items())]
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def _send(self, status: int, data: bytes, headers: dict[str, str], head: bool = False) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

    return Handler


@contextmanager
def serve_hub(hub: FakeHub) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
