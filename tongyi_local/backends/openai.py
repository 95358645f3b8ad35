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

Why httpx rather than the ``openai`` SDK: httpx is already required by the ``dashscope`` SDK, so
this backend adds no dependency; the wire protocol is a POST and an SSE stream; the SDK would bring
a second HTTP stack and its own retry loop (to be disabled in favour of the shared policy), and it
insists on an API key that local servers do not have. Errors are mapped once, here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from ..errors import (AuthenticationError, ConfigError, InvalidRequestError, RateLimitError,
                      RemoteConnectionError, RemoteError, RemoteRequestError, RemoteTimeoutError,
                      ResponseFormatError, ServerError, TongyiError)
from ..types import Chunk, Request, Sampling
from .base import BaseGenerator
from .remote import (Secret, StreamClock, ToolCallAssembler, coerce_sampling, redact,
                     resolve_key, retry_after, short, wire_messages)
from .retry import RetryPolicy, retrying_stream

log = logging.getLogger("tongyi_local.openai")


class OpenAIGenerator(BaseGenerator):
    """A model served over the OpenAI chat/completions protocol."""

    remote = True

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
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(self.timeout_s),
                                    follow_redirects=False)

    def __repr__(self) -> str:
        key = ("set" if self._api_key else
               f"from ${self.api_key_env}" if self.api_key_env else "none")
        return f"OpenAIGenerator(model={self.model!r}, base_url={self.base_url!r}, api_key=<{key}>)"

    # --- the backend -------------------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        headers = self._headers()  # a named but missing key is an error before any request
        if request.prompt is not None and not request.prompt.strip():
            raise InvalidRequestError(f"{self.name}: the prompt is empty")
        path, body = self._body(request)
        clock = StreamClock()
        return retrying_stream(self.retry, lambda: self._attempt(path, body, headers, clock.start),
                               backend=self.name)

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

    # --- helpers -----------------------------------------------------------------------------
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
            if request.tools:
                body["tools"] = [dict(t) for t in request.tools]
        else:
            path = "/completions"
            body["prompt"] = request.prompt
        body.update(self.extra_body)
        return path, body

    def _attempt(self, path: str, body: dict[str, Any], headers: dict[str, str],
                 start: float) -> Iterator[Chunk]:
        """One HTTP request: stream its text as chunks, then the final chunk with the Completion."""
        state = _StreamState(StreamClock(start))
        try:
            with self._client.stream("POST", path, json=body, headers=headers) as rsp:
                if rsp.status_code != 200:
                    raise self._status_error(rsp)
                if "text/event-stream" not in rsp.headers.get("content-type", ""):
                    text = state.take(json.loads(rsp.read()), whole=True)  # server ignored stream
                    if text:
                        yield Chunk(text)
                else:
                    for line in rsp.iter_lines():
                        data = _sse_data(line)
                        if data is None:
                            continue
                        if data == "[DONE]":
                            state.done = True
                            break
                        event = json.loads(data)
                        if isinstance(event, Mapping) and event.get("error"):
                            raise self._stream_error(event["error"])
                        text = state.take(event)
                        if text:
                            yield Chunk(text)
        except TongyiError:
            raise
        except httpx.TimeoutException as e:
            raise RemoteTimeoutError(
                f"{self.name}: no answer from {self.base_url} within {self.timeout_s:g} s "
                f"({type(e).__name__}); raise timeout_s or check the server's load",
                backend=self.name) from None
        except httpx.ConnectError as e:
            raise RemoteConnectionError(
                f"{self.name}: cannot connect to {self.base_url} ({short(str(e), 120)}); "
                "is the server running and base_url right?", backend=self.name) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise RemoteConnectionError(
                f"{self.name}: the connection to {self.base_url} dropped mid-answer "
                f"({type(e).__name__}); try again", backend=self.name) from None
        except httpx.HTTPError as e:
            raise RemoteError(f"{self.name}: request to {self.base_url} failed "
                              f"({type(e).__name__})", backend=self.name) from None
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise ResponseFormatError(
                f"{self.name}: the answer from {self.base_url} is not the OpenAI protocol "
                f"({type(e).__name__}); check base_url (it usually ends in /v1)",
                backend=self.name) from None
        if state.raw_finish is None and not state.done:
            raise RemoteConnectionError(
                f"{self.name}: the stream from {self.base_url} ended before the answer was "
                "finished; try again", backend=self.name)
        completion = state.completion(self.name)
        yield Chunk("", finish_reason=completion.finish_reason, completion=completion)

    def _status_error(self, rsp: httpx.Response) -> RemoteError:
        raw = b""
        for piece in rsp.iter_bytes():  # error bodies are small; read at most 64 KiB of one
            raw += piece
            if len(raw) > 65536:
                break
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


class _StreamState:
    """What one answer has accumulated: text, tool calls, finish reason, usage, server timings."""

    def __init__(self, clock: StreamClock) -> None:
        self.clock = clock
        self.tools = ToolCallAssembler()
        self.parts: list[str] = []
        self.raw_finish: object = None
        self.usage: Mapping[str, Any] = {}
        self.timings: Mapping[str, Any] | None = None
        self.done = False

    def take(self, event: Mapping[str, Any], whole: bool = False) -> str:
        """Absorb one event (or a whole non-streamed answer); return its new text."""
        if event.get("usage"):
            self.usage = event["usage"]
        if isinstance(event.get("timings"), Mapping):
            self.timings = event["timings"]
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
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
        self.clock.piece()
        self.parts.append(text)
        return text

    def completion(self, model: str):
        details = self.usage.get("prompt_tokens_details") or {}
        return self.clock.completion(
            text="".join(self.parts), raw_finish=self.raw_finish, tool_calls=self.tools.calls(),
            prompt_tokens=self.usage.get("prompt_tokens"),
            completion_tokens=self.usage.get("completion_tokens"),
            cached_tokens=int(details.get("cached_tokens") or 0), model=model,
            server_timings=self.timings)


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, event names and blank lines."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()
