"""A tiny model hub on 127.0.0.1 that speaks the URL layout huggingface_hub downloads from.

Why: pulls are tested with the real huggingface_hub over real HTTP, because the hub itself
cannot be reached here. It serves what ``huggingface_hub.file_download`` asks for:

    HEAD/GET /{owner}/{repo}/resolve/{revision}/{path}

answered with ``X-Repo-Commit`` (the commit the revision resolves to), ``ETag`` and
``X-Linked-Etag`` (the file's sha256, as the hub does for LFS files), ``X-Linked-Size``,
``Content-Length`` and ``Accept-Ranges``; ``Range: bytes=N-`` gets a 206 with ``Content-Range``.
Missing repos, revisions and files get 404 with the hub's ``X-Error-Code``. That is all
``hf_hub_download`` needs (a HEAD for the commit, ETag and size, then a GET of the commit's file).
Faults can be injected: drop the connection mid-body, stall mid-body, answer 500, or serve bytes
unlike the advertised ETag.
Every request is recorded. The server binds port 0 and lives at most ``lifetime_s`` seconds.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    status: int = 0


@dataclass
class Faults:
    drop_after: int | None = None      # next GET: send this many body bytes, then hang up
    stall_after: int | None = None     # next GET: send this many body bytes, then wait (<= 20 s)
    fail_next: int = 0                 # the next N GETs answer 500
    corrupt: bool = False              # serve bytes that do not match the advertised ETag


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)                 # branch/tag -> commit
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)   # commit -> path -> bytes

    def resolve(self, revision: str) -> str | None:
        if revision in self.files:
            return revision
        return self.refs.get(revision)


class FakeHub:
    """``with FakeHub() as hub: hub.add(...); os.environ["HF_ENDPOINT"] = hub.url``."""

    def __init__(self, lifetime_s: float = 120.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []  # server-side failures other than hang-ups
        self.faults = Faults()
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._stalled = threading.Event()  # a stalled GET has sent its first bytes
        self._release = threading.Event()  # ends every stall (set on exit)

    def wait_stalled(self, timeout: float) -> bool:
        return self._stalled.wait(timeout)

    def add(self, repo: str, path: str, data: bytes, *, revision: str = "main",
            commit: str | None = None) -> str:
        """Publish ``data`` as ``path`` in a new commit that ``revision`` points at; the commit."""
        r = self.repos.setdefault(repo, Repo())
        commit = commit or hashlib.sha1(f"{repo}{path}{len(r.files)}".encode() + data).hexdigest()
        base = dict(r.files.get(r.refs.get(revision, ""), {}))
        r.files[commit] = base | {path: data}
        r.refs[revision] = commit
        return commit

    def gets(self, path_suffix: str = "") -> list[Request]:
        return [q for q in self.requests if q.method == "GET" and q.path.endswith(path_suffix)]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass
        Handler.hub = hub
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.hub = hub
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self._deadline = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    hub: FakeHub

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up (as a cancelled download does) are normal here; keep the rest."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            self.hub.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # a stuck client cannot hold a handler thread for long

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"",
               send: bool = True) -> None:
        self._record.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send and body:
            self.wfile.write(body)

    def _error(self, code: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(404, headers, code.encode())

    def _serve(self, body: bool) -> None:
        hub = self.hub
        self._record = Request(self.command, self.path,
                               {k.lower(): v for k, v in self.headers.items()})
        with hub._lock:
            hub.requests.append(self._record)
        parts = self.path.split("?")[0].split("/")
        # ['', owner, name, 'resolve', revision, *path]
        if len(parts) < 6 or parts[3] != "resolve":
            return self._reply(404, {}, b"not a hub url")
        repo, revision, path = f"{parts[1]}/{parts[2]}", unquote(parts[4]), unquote("/".join(parts[5:]))
        r = hub.repos.get(repo)
        if r is None:
            return self._error("RepoNotFound")
        commit = r.resolve(revision)
        if commit is None:
            return self._error("RevisionNotFound")
        data = r.files[commit].get(path)
        if data is None:
            return self._error("EntryNotFound", commit)
        sha = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if not body:
            return self._reply(200, headers | {"Content-Length": str(len(data))}, send=False)
        with hub._lock:
            faults = hub.faults
            drop, faults.drop_after = faults.drop_after, None
            fail = faults.fail_next > 0 and drop is None
            if fail:
                faults.fail_next -= 1
        if fail:
            return self._reply(500, {}, b"injected failure")
        if faults.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[6:-1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        headers["Content-Length"] = str(len(payload))
        stall, faults.stall_after = faults.stall_after, None
        if stall is not None:  # a client killed meanwhile: the write below fails, which is fine
            self._reply(status, headers, send=False)
            self.wfile.write(payload[:stall])
            self.wfile.flush()
            hub._stalled.set()
            hub._release.wait(20)
            self.close_connection = True
            return
        if drop is not None:
            self._reply(status, headers, send=False)
            self.wfile.write(payload[:drop])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # SHUT_RDWR: the client sees a short body
            return
        self._reply(status, headers, payload)
