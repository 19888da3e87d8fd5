"""Local stand-ins for the hosts `memguard fetch` talks to, on 127.0.0.1 only: a file and image server with
awkward responses, and a fake Hugging Face hub (the endpoints huggingface_hub's snapshot_download calls)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

Route = Callable[["Handler", int], None]  # (handler, how many times this path was asked for before)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and self.command != "HEAD":
            self.wfile.write(body)

    def send_file(self, data: bytes, content_type: str = "application/octet-stream", extra: dict | None = None,
                  cut_at: int | None = None) -> None:
        """``data`` honouring ``Range: bytes=N-``; ``cut_at``: the connection closes after that many bytes."""
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            if start >= len(data):
                return self.send(416, headers={"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut_at is not None and start < cut_at:
            self.wfile.write(body[: cut_at - start])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def route(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.server.lock:
            count = self.server.hits.get(path, 0)
            self.server.hits[path] = count + 1
            self.server.requests += 1
            if self.server.requests > self.server.max_requests:
                return self.send(503)
        for pattern, handler in self.server.routes:
            if re.fullmatch(pattern, path):
                return handler(self, count)
        self.send(404, b"not found")

    do_GET = route
    do_HEAD = route


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, routes: list[tuple[str, Route]], max_requests: int = 5000) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes, self.hits, self.lock = routes, {}, threading.Lock()
        self.requests, self.max_requests = 0, max_requests

    def handle_error(self, request, client_address) -> None:  # a client that hung up early: not the test's concern
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serve(routes: list[tuple[str, Route]], max_requests: int = 5000) -> Iterator[Server]:
    server = Server(routes, max_requests)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def static(data: bytes, content_type: str = "application/octet-stream", **kw) -> Route:
    return lambda h, n: h.send_file(data, content_type, **kw)


def status(code: int, body: bytes = b"error") -> Route:
    return lambda h, n: h.send(code, body)


def fail_first(times: int, code: int, then: Route) -> Route:
    return lambda h, n: h.send(code, b"busy") if n < times else then(h, n)


def redirect(to: str) -> Route:
    return lambda h, n: h.send(302, headers={"Location": to})


def slow(seconds: float, then: Route) -> Route:
    def route(h: Handler, n: int) -> None:
        time.sleep(seconds)
        then(h, n)
    return route


# ---------------------------------------------------------------------------------------------------------------
# A fake hub


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_routes(repo: str, folder: Path, commit: str = COMMIT, gated: bool = False) -> list[tuple[str, Route]]:
    """The endpoints snapshot_download calls for ``repo`` (serving ``folder`` at ``commit``, also as ``main``):
    the revision info, the recursive tree listing, and resolve/<revision>/<file> (HEAD and GET) with the headers
    the client checks (X-Repo-Commit, ETag, Content-Length)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    revisions = (commit, "main")

    def gate(h: Handler) -> bool:
        if gated:
            h.send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated repo",
                                              "Content-Type": "application/json"})
        return gated

    def info(h: Handler, n: int) -> None:
        if gate(h):
            return
        rev = unquote(h.path.split("/revision/")[1].split("?")[0])
        if rev not in revisions:
            return h.send(404, b'{"error": "Revision Not Found"}', {"X-Error-Code": "RevisionNotFound"})
        body = json.dumps({"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}).encode()
        h.send(200, body, {"Content-Type": "application/json"})

    def tree(h: Handler, n: int) -> None:
        if gate(h):
            return
        body = json.dumps([{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                           for f, d in files.items()]).encode()
        h.send(200, body, {"Content-Type": "application/json"})

    def resolve(h: Handler, n: int) -> None:
        if gate(h):
            return
        _, rest = unquote(urlsplit(h.path).path).split("/resolve/", 1)
        rev, name = rest.split("/", 1)
        if rev not in revisions or name not in files:
            return h.send(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = files[name]
        h.send_file(data, extra={"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

    r = re.escape(repo)
    return [(rf"/api/models/{r}/revision/.*", info), (rf"/api/models/{r}/tree/.*", tree),
            (rf"/{r}/resolve/.*", resolve)]


def removed_repo_routes(repo: str) -> list[tuple[str, Route]]:
    """What the hub answers for a repository that was removed (or never existed): 401, RepoNotFound."""
    def gone(h: Handler, n: int) -> None:
        h.send(401, b'{"error": "Repository Not Found"}', {"X-Error-Code": "RepoNotFound",
                                                           "X-Error-Message": "Repository not found",
                                                           "Content-Type": "application/json"})
    r = re.escape(repo)
    return [(rf"/api/models/{r}/.*", gone), (rf"/{r}/resolve/.*", gone)]
