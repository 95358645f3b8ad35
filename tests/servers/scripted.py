"""A scripted HTTP server on 127.0.0.1 speaking DashScope's or the OpenAI wire protocol.

Why: DashScope cannot be reached from here, and a real model server cannot be told to answer 429,
500, garbage or nothing. The real SDKs and HTTP clients talk to this real socket; only the other
end is scripted. Each generation request consumes the next ``Step`` (or repeats ``default``).

DashScope: POST {base}/services/aigc/text-generation/generation, ``Authorization: Bearer <key>``,
``X-DashScope-SSE: enable``; events are ``id:/event:result/:HTTP_STATUS/200/data:{json}`` blocks whose
``output.choices[0].message`` holds the incremental content or tool-call deltas; errors are JSON
``{"code", "message", "request_id"}``. GET {base}/models lists models.
OpenAI: POST {base}/chat/completions and /completions, ``data: {json}`` chunks then ``data: [DONE]``;
errors are ``{"error": {"message", "type", "code"}}``. GET {base}/models lists models.

Every wait is bounded (socket timeouts, ``Event.wait``), and ``close()`` releases sleeping handlers.

``trickle(*pieces, every_s=...)`` streams slowly, so a test can go away mid-answer; the server
counts every client that left before its answer was written (``disconnects``; wait for it with
``wait_disconnects``), which is how a test proves a cancelled request closed its connection.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Step:
    kind: str  # text | tool_call | status | malformed_stream | malformed_json | slow | drop |
    #            no_output | stream_error | trickle
    pieces: tuple[str, ...] = ("Hello", " world")
    finish: str = "stop"
    usage: tuple[int, int] = (7, 2)
    status: int = 200
    code: str = ""
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    tool_name: str = "get_weather"


def text(*pieces: str, finish: str = "stop", usage: tuple[int, int] = (7, 2)) -> Step:
    return Step("text", pieces=pieces or ("Hello", " world"), finish=finish, usage=usage)


def tool_call(name: str, *arg_pieces: str) -> Step:
    return Step("tool_call", tool_name=name, pieces=arg_pieces, finish="tool_calls")


def status(code: int, error_code: str = "", message: str = "", **headers: str) -> Step:
    return Step("status", status=code, code=error_code, message=message,
                headers={k.replace("_", "-"): v for k, v in headers.items()})


def slow(seconds: float) -> Step:
    return Step("slow", seconds=seconds)


def trickle(*pieces: str, every_s: float = 0.2) -> Step:
    """Stream ``pieces`` (default: 50 of them) one every ``every_s`` seconds, then finish; a
    client that goes away meanwhile is noticed at once and counted in ``disconnects``."""
    return Step("trickle", pieces=pieces or tuple(f"p{i} " for i in range(50)), seconds=every_s)


def drop(*pieces: str) -> Step:
    """Stream ``pieces`` then cut the connection without finishing the chunked body."""
    return Step("drop", pieces=pieces or ("Hello",))


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class ScriptedServer:
    def __init__(self, protocol: str, *, api_key: str | None = None) -> None:
        assert protocol in ("dashscope", "openai")
        self.protocol = protocol
        self.api_key = api_key
        self.steps: list[Step] = []
        self.default = text()
        self.requests: list[Recorded] = []
        self.stopping = threading.Event()
        self.disconnects = 0  # answers the client walked away from before their end
        self._lock = threading.Lock()
        self._left = threading.Condition(self._lock)
        outer = self

        class Handler(_Handler):
            server_state = outer

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        host, port = self.httpd.server_address[:2]
        root = f"http://{host}:{port}"
        self.url = root + ("/api/v1" if protocol == "dashscope" else "/v1")

    def script(self, *steps: Step) -> None:
        with self._lock:
            self.steps.extend(steps)

    def next_step(self) -> Step:
        with self._lock:
            return self.steps.pop(0) if self.steps else self.default

    def generation_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]

    def client_left(self) -> None:
        with self._left:
            self.disconnects += 1
            self._left.notify_all()

    def wait_disconnects(self, count: int = 1, timeout: float = 1.0) -> bool:
        """Whether ``count`` clients have gone away mid-answer, waiting at most ``timeout`` s."""
        with self._left:
            return self._left.wait_for(lambda: self.disconnects >= count, timeout)

    def close(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # socket timeout: a stuck client cannot hold a handler thread forever
    server_state: ScriptedServer

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # --- entry points ------------------------------------------------------------------------
    def do_GET(self) -> None:
        state = self.server_state
        state.requests.append(Recorded("GET", self.path, dict(self.headers), None))
        if not self._authorised():
            return
        if self.path.split("?")[0].endswith("/models"):
            if state.protocol == "dashscope":
                body = {"request_id": _rid(), "output": {"models": [{"model": "qwen-test"}],
                                                         "total": 1, "page_no": 1, "page_size": 1}}
            else:
                body = {"object": "list", "data": [{"id": "test-model", "object": "model"}]}
            return self._json(200, body)
        self._json(404, {"code": "NotFound", "message": "no such path"})

    def do_POST(self) -> None:
        state = self.server_state
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 10_000_000))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        state.requests.append(Recorded("POST", self.path, dict(self.headers), body))
        if not self._authorised():
            return
        step = state.next_step()
        if step.kind == "slow":
            state.stopping.wait(step.seconds)  # bounded; close() cuts it short
            step = text()
        if step.kind == "status":
            return self._error(step)
        try:
            if step.kind == "malformed_json":
                return self._raw(200, "application/json", b'{"output": {"choices": [ oops')
            self._stream(step, body or {})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout test, cancelled task)
            state.client_left()

    # --- helpers -----------------------------------------------------------------------------
    def _authorised(self) -> bool:
        key = self.server_state.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(status(401, "InvalidApiKey", "Invalid API-key provided."))
        return False

    def _error(self, step: Step) -> None:
        if self.server_state.protocol == "dashscope":
            body = {"code": step.code or "InternalError", "message": step.message or "error",
                    "request_id": _rid()}
        else:
            body = {"error": {"message": step.message or "error", "type": step.code or "error",
                              "code": step.status}}
        self._json(step.status, body, step.headers)

    def _json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._raw(code, "application/json", json.dumps(body).encode(), headers)

    def _raw(self, code: int, ctype: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` (cut short by ``close()``), watching the socket: a client that closed
        its end makes it readable with nothing to read, and that is reported at once rather than
        at the second write after it (the first one usually still succeeds)."""
        deadline = time.monotonic() + seconds
        stopping = self.server_state.stopping
        while (left := deadline - time.monotonic()) > 0 and not stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                raise ConnectionResetError("the client closed the connection")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, step: Step, body: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream;charset=UTF-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        events = (_dashscope_events if self.server_state.protocol == "dashscope"
                  else _openai_events)(step, body)
        for i, event in enumerate(events):
            if step.kind == "trickle" and i:
                self._pause(step.seconds)
            self._chunk(event)
        if step.kind == "drop":
            self.wfile.write(b"ff\r\npartial")  # a chunk cut short: the client sees a broken body
            self.wfile.flush()
            return
        self._chunk(b"")


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many concurrent clients connect at once; 5 would drop SYNs
    daemon_threads = True


def free_port() -> int:
    """A loopback port with nothing listening (bound, read, released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rid() -> str:
    return str(uuid.uuid4())


def _dashscope_events(step: Step, body: dict[str, Any]) -> list[bytes]:
    rid = _rid()
    n_in, n_out = step.usage

    def event(i: int, message: dict[str, Any], finish: str, out_tokens: int) -> bytes:
        data = {"output": {"choices": [{"message": {"role": "assistant", **message},
                                        "finish_reason": finish}]},
                "usage": {"input_tokens": n_in, "output_tokens": out_tokens,
                          "total_tokens": n_in + out_tokens,
                          "prompt_tokens_details": {"cached_tokens": 3}},
                "request_id": rid}
        return (f"id:{i}\nevent:result\n:HTTP_STATUS/200\ndata:{json.dumps(data)}\n\n").encode()

    if step.kind == "malformed_stream":
        return [b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\": {\"choices\": [\n\n"]
    if step.kind == "no_output":
        return [b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"unexpected\": true}\n\n"]
    if step.kind == "tool_call":
        out = [event(1, {"content": "", "tool_calls": [
            {"index": 0, "id": "call_abc", "type": "function",
             "function": {"name": step.tool_name, "arguments": ""}}]}, "null", 1)]
        for i, piece in enumerate(step.pieces, start=2):
            out.append(event(i, {"content": "", "tool_calls": [
                {"index": 0, "id": "", "type": "function", "function": {"arguments": piece}}]},
                "null", i))
        out.append(event(len(out) + 1, {"content": ""}, "tool_calls", n_out))
        return out
    out = []
    for i, piece in enumerate(step.pieces, start=1):
        last = i == len(step.pieces) and step.kind != "drop"
        out.append(event(i, {"content": piece}, step.finish if last else "null",
                         n_out if last else i))
    return out


def _openai_events(step: Step, body: dict[str, Any]) -> list[bytes]:
    chat = "messages" in body
    base = {"id": "cmpl-" + _rid(), "created": 0, "model": body.get("model", "test-model"),
            "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(delta: Any, finish: str | None) -> bytes:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                  else {"index": 0, "text": delta.get("content", ""), "finish_reason": finish})
        return b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n"

    if step.kind == "malformed_stream":
        return [b"data: {\"choices\": [\n\n"]
    if step.kind == "wrong_shape":  # valid JSON, not the protocol's shape
        return [b'data: {"choices": "not a list"}\n\n', b"data: [DONE]\n\n"]
    if step.kind == "stream_error":
        return [event({"content": "Hel"}, None),
                b"data: " + json.dumps({"error": {"message": "model crashed", "code": 500}}).encode()
                + b"\n\n"]
    out = []
    if step.kind == "tool_call":
        out.append(event({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_abc", "type": "function",
             "function": {"name": step.tool_name, "arguments": ""}}]}, None))
        for piece in step.pieces:
            out.append(event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None))
        out.append(event({}, "tool_calls"))
    else:
        for piece in step.pieces:
            out.append(event({"content": piece}, None))
        if step.kind == "drop":
            return out
        out.append(event({}, step.finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": step.usage[0], "completion_tokens": step.usage[1],
                 "total_tokens": sum(step.usage)}
        out.append(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out
