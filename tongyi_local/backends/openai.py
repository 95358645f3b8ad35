"""Any OpenAI-compatible server (llama.cpp's llama-server, llama-cpp-python's server, vLLM,
Ollama, ...) behind the Generator protocol.

    OpenAIGenerator(model: str, *, base_url: str, api_key=None, api_key_env=None,
                    timeout_s=60.0, retry=None, sampling=None, name=None, extra_body=None,
                    sampling_extras=True, remote=True)

- ``base_url`` is the API root including ``/v1`` (e.g. ``http://127.0.0.1:8080/v1``); ``chat``
  posts to ``/chat/completions``, ``complete`` to ``/completions``, ``health()`` gets ``/models``.
- The key is ``api_key`` or, read at call time, the variable named by ``api_key_env`` (which then
  must be set). No key means no Authorization header, as local servers expect. Never logged.
- ``sampling_extras`` also sends ``top_k``, ``min_p``, ``repeat_penalty`` (and ``ignore_eos``),
  which llama.cpp, vLLM and Ollama understand; turn it off for servers that reject unknown fields.
  ``extra_body`` is merged into every request body (e.g. ``{"tool_choice": "required"}``).
- ``remote=False`` declares a server you trust with private data (one on this machine), so that a
  ``local-only`` role may use it; the default is remote.
- ``timeout_s`` bounds connecting and each wait for data; ``retry`` is the shared ``RetryPolicy``.

Every request streams (with ``stream_options.include_usage``) so every result has a TTFT. When a
server reports no usage, completion tokens are the number of streamed pieces and prompt tokens 0.

``acomplete``/``achat``/``astream`` run on the event loop over an ``httpx.AsyncClient`` (one per
loop, made on first use; ``close()`` or ``await aclose()`` closes them), not on a thread: a
cancelled task or a closed async stream closes its HTTP connection at once. Both paths build the
request, parse the stream (``_StreamState``) and map errors (``_mapped``, ``_status_error``) with
the same code; only the reading differs.

Why httpx rather than the ``openai`` SDK: httpx is already required by the ``dashscope`` SDK, so
this backend adds no dependency; the wire protocol is a POST and an SSE stream; the SDK would bring
a second HTTP stack and its own retry loop (to be disabled in favour of the shared policy), and it
insists on an API key that local servers do not have. Errors are mapped once, here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import (AuthenticationError, ConfigError, InvalidRequestError, RateLimitError,
                      RemoteConnectionError, RemoteError, RemoteRequestError, RemoteTimeoutError,
                      ResponseFormatError, ServerError, TongyiError)
from ..types import Chunk, Request, Sampling
from .aio_native import NativeAsync, PerLoop
from .base import BaseGenerator
from .remote import (NotProtocol, Secret, StreamClock, StreamedAnswer, as_list,
                     as_mapping, coerce_sampling, redact, resolve_key, retry_after, short,
                     wire_messages, wire_tools)
from .retry import RetryPolicy, aretrying_stream, retrying_stream

log = logging.getLogger("tongyi_local.openai")


class OpenAIGenerator(NativeAsync, BaseGenerator):
    """A model served over the OpenAI chat/completions protocol."""

    remote = True
    backend = "openai"

    def __init__(self, model: str, *, base_url: str, api_key: str | None = None,
                 api_key_env: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy | Mapping[str, Any] | None = None,
                 sampling: Sampling | Mapping[str, Any] | None = None, name: str | None = None,
                 extra_body: Mapping[str, Any] | None = None, sampling_extras: bool = True,
                 remote: bool = True) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("OpenAIGenerator needs the server's model name, e.g. model='qwen2.5'")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http(s) URL such as http://127.0.0.1:8080/v1 "
                              f"(got {base_url!r})")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a number > 0 (got {timeout_s!r})")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self._api_key = Secret(api_key) if api_key else None  # shows as ***, never the key
        self.timeout_s = float(timeout_s)
        self.retry = RetryPolicy.coerce(dict(retry) if isinstance(retry, Mapping) else retry)
        self.extra_body = dict(extra_body or {})
        self.sampling_extras = sampling_extras
        self.remote = bool(remote)
        default = coerce_sampling(sampling)
        if default is not None:
            self.default_sampling = default
        self.name = name or f"openai:{model}"
        self._client = httpx.Client(**self._client_options())
        self._aclients = PerLoop(lambda: httpx.AsyncClient(**self._client_options()),
                                 lambda client: client.aclose())

    def __repr__(self) -> str:
        key = ("set" if self._api_key else
               f"from ${self.api_key_env}" if self.api_key_env else "none")
        return f"OpenAIGenerator(model={self.model!r}, base_url={self.base_url!r}, api_key=<{key}>)"

    # --- the backend -------------------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        call = self._prepare(request)
        return retrying_stream(self.retry, lambda: self._attempt(call), backend=self.name)

    def _agenerate(self, request: Request) -> AsyncIterator[Chunk]:
        call = self._prepare(request)
        return aretrying_stream(self.retry, lambda: self._aattempt(call), backend=self.name)

    def health(self) -> bool:
        """True when ``GET {base_url}/models`` answers 200 within the timeout."""
        try:
            rsp = self._client.get("/models", headers=self._headers(),
                                   timeout=min(self.timeout_s, 5.0))
            if rsp.status_code != 200:
                log.info("%s: health check got status %d", self.name, rsp.status_code)
            return rsp.status_code == 200
        except (httpx.HTTPError, TongyiError) as e:
            log.info("%s: health check failed: %s", self.name, type(e).__name__)
            return False

    def _release(self) -> None:
        self._client.close()
        self._aclients.close_all()

    # --- helpers -----------------------------------------------------------------------------
    def _client_options(self) -> dict[str, Any]:
        """What the sync client and every loop's async client are made with."""
        return {"base_url": self.base_url, "timeout": httpx.Timeout(self.timeout_s),
                "follow_redirects": False}

    def _prepare(self, request: Request) -> _Call:
        """What every attempt sends; a named but missing key is an error before any request."""
        headers = self._headers()
        if request.prompt is not None and not request.prompt.strip():
            raise InvalidRequestError(f"{self.name}: the prompt is empty")
        path, body = self._body(request)
        return _Call(path, body, headers, StreamClock().start)

    def _headers(self) -> dict[str, str]:
        key = resolve_key(self._api_key, self.api_key_env, self.name,
                          required=self.api_key_env is not None and not self._api_key)
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, request: Request) -> tuple[str, dict[str, Any]]:
        s = request.sampling
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True},
                                "max_tokens": s.max_tokens, "temperature": s.temperature,
                                "top_p": s.top_p}
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if self.sampling_extras:
            body.update(top_k=s.top_k, min_p=s.min_p, repeat_penalty=s.repeat_penalty)
            if s.ignore_eos:
                body["ignore_eos"] = True
        if request.messages is not None:
            path = "/chat/completions"
            body["messages"] = wire_messages(request.messages)
            body.update(wire_tools(request))
            if request.response_schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": request.response_schema.name, "strict": True,
                    "schema": dict(request.response_schema.schema)}}
        else:
            path = "/completions"
            body["prompt"] = request.prompt
        body.update(self.extra_body)
        return path, body

    def _attempt(self, call: _Call) -> Iterator[Chunk]:
        """One HTTP request: stream its text as chunks, then the final chunk with the Completion."""
        state = _StreamState(StreamClock(call.start), self._stream_error)
        with self._errors_mapped(), self._client.stream(
                "POST", call.path, json=call.body, headers=call.headers) as rsp:
            if rsp.status_code != 200:
                raise self._status_error(rsp, _head(rsp.iter_bytes()))
            if not _is_sse(rsp):  # the server ignored "stream": one JSON answer
                if chunk := state.whole(rsp.read()):
                    yield chunk
            else:
                for line in rsp.iter_lines():
                    if chunk := state.feed(line):
                        yield chunk
                    if state.done:
                        break
        yield self._final(state)

    async def _aattempt(self, call: _Call) -> AsyncIterator[Chunk]:
        """``_attempt`` on the event loop: the same parsing and errors, read asynchronously."""
        state = _StreamState(StreamClock(call.start), self._stream_error)
        with self._errors_mapped():
            client = await self._aclients.get()
            async with client.stream("POST", call.path, json=call.body,
                                     headers=call.headers) as rsp:
                if rsp.status_code != 200:
                    raise self._status_error(rsp, await _ahead(rsp.aiter_bytes()))
                if not _is_sse(rsp):
                    if chunk := state.whole(await rsp.aread()):
                        yield chunk
                else:
                    async for line in rsp.aiter_lines():
                        if chunk := state.feed(line):
                            yield chunk
                        if state.done:
                            break
        yield self._final(state)

    @contextmanager
    def _errors_mapped(self) -> Iterator[None]:
        """The one place httpx and protocol errors, sync or async, become the library's."""
        try:
            yield
        except TongyiError:
            raise
        except _UNDERSTOOD as exc:
            raise self._mapped(exc) from exc

    def _final(self, state: _StreamState) -> Chunk:
        """The last chunk, carrying the Completion; a stream cut before its end is an error."""
        if state.raw_finish is None and not state.done:
            raise RemoteConnectionError(
                f"{self.name}: the stream from {self.base_url} ended before the answer was "
                "finished; try again", backend=self.name)
        with self._errors_mapped():  # usage figures of the wrong shape are a protocol error
            completion = state.completion(self.name)
        return Chunk("", finish_reason=completion.finish_reason, completion=completion)

    def _mapped(self, e: Exception) -> RemoteError:
        """An httpx or parsing error as the library's error: the one mapping, sync and async."""
        if isinstance(e, httpx.TimeoutException):
            return RemoteTimeoutError(
                f"{self.name}: no answer from {self.base_url} within {self.timeout_s:g} s "
                f"({type(e).__name__}); raise timeout_s or check the server's load",
                backend=self.name)
        if isinstance(e, httpx.ConnectError):
            return RemoteConnectionError(
                f"{self.name}: cannot connect to {self.base_url} ({short(str(e), 120)}); "
                "is the server running and base_url right?", backend=self.name)
        if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return RemoteConnectionError(
                f"{self.name}: the connection to {self.base_url} dropped mid-answer "
                f"({type(e).__name__}); try again", backend=self.name)
        if isinstance(e, httpx.HTTPError):
            return RemoteError(f"{self.name}: request to {self.base_url} failed "
                               f"({type(e).__name__})", backend=self.name)
        return ResponseFormatError(
            f"{self.name}: the answer from {self.base_url} is not the OpenAI protocol "
            f"({type(e).__name__}); check base_url (it usually ends in /v1)", backend=self.name)

    def _status_error(self, rsp: httpx.Response, raw: bytes) -> RemoteError:
        """A non-200 answer (``raw``: the start of its body) as the library's error."""
        message = raw.decode("utf-8", "replace")
        try:
            payload = json.loads(raw)
            err = payload.get("error", payload) if isinstance(payload, Mapping) else payload
            if isinstance(err, Mapping):
                message = str(err.get("message") or err.get("detail") or err)
            else:
                message = str(err)
        except ValueError:
            pass
        status = rsp.status_code
        message = short(redact(message, self._api_key))
        common = {"backend": self.name, "status": status}
        if status in (401, 403):
            where = f"${self.api_key_env}" if self.api_key_env else "api_key"
            return AuthenticationError(f"{self.name}: {self.base_url} rejected the credentials "
                                       f"({status}: {message}); check {where}", **common)
        if status == 429:
            return RateLimitError(f"{self.name}: {self.base_url} is throttling requests (429: "
                                  f"{message}); wait or lower the request rate", **common,
                                  retry_after_s=retry_after(rsp.headers))
        if status >= 500:
            return ServerError(f"{self.name}: {self.base_url} failed ({status}: {message}); try "
                               "again later or configure a fallback", **common,
                               retry_after_s=retry_after(rsp.headers))
        if status == 404:
            return RemoteRequestError(f"{self.name}: {self.base_url} has no such endpoint or model "
                                      f"(404: {message}); check base_url (usually ending in /v1) "
                                      f"and model {self.model!r}", **common)
        return RemoteRequestError(f"{self.name}: {self.base_url} rejected the request ({status}: "
                                  f"{message})", **common)

    def _stream_error(self, err: Any) -> RemoteError:
        message = short(redact(str(err.get("message") if isinstance(err, Mapping) else err),
                               self._api_key))
        return ServerError(f"{self.name}: {self.base_url} reported an error mid-stream "
                           f"({message})", backend=self.name)


@dataclass(frozen=True)
class _Call:
    """One prepared request: what each attempt, sync or async, sends."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    start: float  # when the caller asked: TTFT counts retries too


class _StreamState(StreamedAnswer):
    """What one answer has accumulated: text, tool calls, finish reason, usage, server timings.

    The one parser of the protocol: the sync and async attempts only read lines and hand them
    here. ``on_error`` turns an error event in the stream into the exception to raise.
    """

    def __init__(self, clock: StreamClock, on_error: Callable[[Any], Exception]) -> None:
        super().__init__(clock)
        self.on_error = on_error
        self.done = False

    def feed(self, line: str) -> Chunk | None:
        """Absorb one SSE line; its new text as a chunk, if any. ``[DONE]`` sets ``done``."""
        data = _sse_data(line)
        if data is None or self.done:
            return None
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if isinstance(event, Mapping) and event.get("error"):
            raise self.on_error(event["error"])
        text = self.take(event)
        return Chunk(text) if text else None

    def whole(self, raw: bytes) -> Chunk | None:
        """Absorb a whole non-streamed answer (a server that ignored ``stream``)."""
        text = self.take(json.loads(raw), whole=True)
        return Chunk(text) if text else None

    def take(self, event: Any, whole: bool = False) -> str:
        """Absorb one event (or a whole non-streamed answer); return its new text."""
        event = as_mapping(event, "an event")
        if event.get("usage"):
            self.usage = as_mapping(event["usage"], "usage")
        if isinstance(event.get("timings"), Mapping):
            self.timings = event["timings"]
        choices = as_list(event.get("choices"), "choices")
        if not choices:
            return ""
        choice = as_mapping(choices[0], "a choice")
        if choice.get("finish_reason"):
            self.raw_finish = choice["finish_reason"]
        part = choice.get("message" if whole else "delta")
        if isinstance(part, Mapping):
            if self.tools.add(part.get("tool_calls")):
                self.clock.piece()
            text = part.get("content")
        else:
            text = choice.get("text")
        if not isinstance(text, str) or not text:
            return ""
        return self.add_text(text)


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, event names and blank lines."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


# What ``_mapped`` understands: transport errors, and a body that is not the protocol.
_UNDERSTOOD = (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError, NotProtocol)
_ERROR_BODY_LIMIT = 65536  # error bodies are small; never read more than this of one


def _is_sse(rsp: httpx.Response) -> bool:
    return "text/event-stream" in rsp.headers.get("content-type", "")


def _head(pieces: Iterator[bytes]) -> bytes:
    """The start of an error body, read from a sync response."""
    raw = b""
    for piece in pieces:
        raw += piece
        if len(raw) > _ERROR_BODY_LIMIT:
            break
    return raw


async def _ahead(pieces: AsyncIterator[bytes]) -> bytes:
    """The start of an error body, read from an async response."""
    raw = b""
    async for piece in pieces:
        raw += piece
        if len(raw) > _ERROR_BODY_LIMIT:
            break
    return raw
