"""DashScope (Alibaba Cloud Model Studio) behind the Generator protocol, through the official SDK.

    DashScopeGenerator(model: str, *, api_key=None, api_key_env=None, base_url=None,
                       workspace=None, timeout_s=60.0, retry=None, sampling=None, name=None)

- ``model``: a DashScope model name, e.g. ``"qwen-plus"``. ``name`` defaults to ``dashscope:<model>``.
- The key is ``api_key`` or, read at call time, the environment variable ``api_key_env`` (default
  ``DASHSCOPE_API_KEY``). A missing key raises ``AuthenticationError`` before any request. The key
  is never logged, put in a message or shown by ``repr``.
- ``base_url``: the HTTP API root (default: the SDK's ``dashscope.base_http_api_url``, which the SDK
  takes from ``DASHSCOPE_HTTP_BASE_URL``). ``timeout_s`` bounds connecting and each wait for data.
- ``retry``: a ``RetryPolicy`` (or mapping) for 429, 5xx, timeouts and dropped connections.
- ``sampling``: default ``Sampling`` (or mapping). DashScope has no ``min_p``, ``repeat_last_n``
  or ``ignore_eos``; those are not sent. ``top_k=0`` means the server default.

Every request streams (``incremental_output``), so every result has a TTFT; ``complete(prompt)``
sends the prompt as DashScope's ``prompt`` input (the server wraps it as a user turn). SDK and HTTP
errors are mapped once, here, onto ``RemoteError`` subclasses. The SDK logs request bodies and
stream messages at DEBUG; a filter on the ``dashscope`` logger drops those (prompt and output text)
and masks anything key-shaped.

``acomplete``/``achat``/``astream`` use the SDK's own asyncio API, ``dashscope.AioGeneration``
(aiohttp), not the thread-pumped ``aio.AsyncMixin``. Why: it streams the same incremental events
(``incremental_output``), so the same ``_Answer`` parses them and the same ``_status_error`` /
``_exception_error`` map its failures; and it can be cancelled cleanly: a cancelled read unwinds
through the SDK's ``async with response``, which releases the half-read aiohttp response and so
closes its connection at once. Closing an ``astream`` (``aclose()``, ``break``) cancels its reader
task (``aio_native.in_task``) for the same clean unwinding, rather than leaving the SDK's inner
generators to asyncio's finalizer. The aiohttp session is ours (``session=``), one per event loop,
made as the SDK makes its shared one and closed when that loop shuts down or by ``close()`` /
``aclose()``. aiohttp, with ``trust_env`` as the SDK sets it, looks up netrc and proxies on the
loop's default executor (a small bounded pool): no thread per request.
"""

from __future__ import annotations

import json
import os
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, closing, contextmanager
from typing import Any

from ..errors import (AuthenticationError, BackendUnavailableError, ConfigError,
                      InvalidRequestError, RateLimitError, RemoteConnectionError, RemoteError,
                      RemoteRequestError, RemoteTimeoutError, ResponseFormatError, ServerError,
                      TongyiError)
from ..types import Chunk, Request, Sampling
from .aio_native import NativeAsync, PerLoop
from .base import BaseGenerator
from ..chat_format import with_schema_instruction
from .remote import (NotProtocol, Secret, StreamClock, StreamedAnswer, as_list,
                     as_mapping, coerce_sampling, redact, resolve_key, retry_after, short,
                     wire_messages, wire_tools)
from .retry import RetryPolicy, aretrying_stream, retrying_stream

log = logging.getLogger("tongyi_local.dashscope")


class _SdkLogFilter(logging.Filter):
    """Keeps prompt/output text and keys out of the SDK's own log records."""

    _PAYLOAD = ("Request body", "Stream message", "Response:")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(self._PAYLOAD):
            return False
        if msg == "Request failed":  # its traceback is mapped and raised by us instead
            return False
        text = record.getMessage()
        masked = redact(text)
        if masked != text:
            record.msg, record.args = masked, ()
        return True


_FILTER = _SdkLogFilter()


def _sdk() -> Any:
    try:
        import dashscope
    except ImportError as e:  # pragma: no cover - the package is a declared dependency
        raise BackendUnavailableError(
            "the DashScope backend needs the 'dashscope' package: "
            "pip install 'tongyi-local[cloud]'") from e
    sdk_logger = logging.getLogger("dashscope")
    if _FILTER not in sdk_logger.filters:
        sdk_logger.addFilter(_FILTER)
    return dashscope


class DashScopeGenerator(NativeAsync, BaseGenerator):
    """Qwen models on DashScope, with the same results as the local backend."""

    remote = True
    backend = "dashscope"

    def __init__(self, model: str, *, api_key: str | None = None,
                 api_key_env: str | None = None, base_url: str | None = None,
                 workspace: str | None = None, timeout_s: float = 60.0,
                 retry: RetryPolicy | Mapping[str, Any] | None = None,
                 sampling: Sampling | Mapping[str, Any] | None = None,
                 name: str | None = None) -> None:
        if not isinstance(model, str) or not model.strip():
            raise ConfigError("DashScopeGenerator needs a model name, e.g. model='qwen-plus'")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a number > 0 (got {timeout_s!r})")
        self.model = model
        self.base_url = base_url.rstrip("/") if base_url else None
        self.workspace = workspace
        self.timeout_s = float(timeout_s)
        self.retry = RetryPolicy.coerce(dict(retry) if isinstance(retry, Mapping) else retry)
        self.api_key_env = api_key_env or "DASHSCOPE_API_KEY"
        self._api_key = Secret(api_key) if api_key else None  # shows as ***, never the key
        default = coerce_sampling(sampling)
        if default is not None:
            self.default_sampling = default
        self.name = name or f"dashscope:{model}"
        self._aclients = PerLoop(_aio_session, lambda session: session.close())

    def __repr__(self) -> str:
        key = "set" if self._api_key else f"from ${self.api_key_env}"
        return (f"DashScopeGenerator(model={self.model!r}, base_url={self._url()!r}, "
                f"api_key=<{key}>)")

    # --- the backend -------------------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        kwargs, start = self._prepare(request)
        return retrying_stream(self.retry, lambda: self._attempt(kwargs, start),
                               backend=self.name)

    def _agenerate(self, request: Request) -> AsyncIterator[Chunk]:
        kwargs, start = self._prepare(request)
        return aretrying_stream(self.retry, lambda: self._aattempt(kwargs, start),
                                backend=self.name)

    def _release(self) -> None:
        self._aclients.close_all()

    def health(self) -> bool:
        """True when the endpoint answers an authenticated model listing within the timeout."""
        try:
            key = self._key()
            sdk = _sdk()
            extra = {"base_address": self.base_url} if self.base_url else {}
            rsp = sdk.Models.list(page=1, page_size=1, api_key=key, workspace=self.workspace,
                                  request_timeout=min(self.timeout_s, 10.0), **extra)
            ok = getattr(rsp, "status_code", None) == 200
            if not ok:
                log.info("%s: health check got status %s", self.name,
                         getattr(rsp, "status_code", "?"))
            return ok
        except TongyiError as e:
            log.info("%s: health check failed: %s", self.name, e)
            return False
        except Exception as e:  # noqa: BLE001 - a health check answers, it does not raise
            log.info("%s: health check failed: %s", self.name, type(e).__name__)
            return False

    # --- helpers -----------------------------------------------------------------------------
    def _prepare(self, request: Request) -> tuple[dict[str, Any], float]:
        """The SDK call's arguments and the request's start time, shared by every attempt;
        a missing key is a clear error now, before any request."""
        key = self._key()
        if request.prompt is not None and not request.prompt.strip():
            raise InvalidRequestError(f"{self.name}: the prompt is empty")
        return self._call_kwargs(request, key), StreamClock().start

    def _key(self) -> str:
        key = resolve_key(self._api_key, self.api_key_env, self.name, required=True)
        assert key is not None
        return key

    def _url(self) -> str:
        if self.base_url:
            return self.base_url
        try:
            return str(_sdk().base_http_api_url)
        except TongyiError:
            return "<dashscope default>"

    def _call_kwargs(self, request: Request, key: str) -> dict[str, Any]:
        s = request.sampling
        kwargs: dict[str, Any] = {
            "model": self.model, "api_key": key, "stream": True, "incremental_output": True,
            "result_format": "message", "temperature": s.temperature, "top_p": s.top_p,
            "max_tokens": s.max_tokens, "request_timeout": self.timeout_s,
        }
        if request.messages is not None:
            messages = request.messages
            if request.response_schema is not None:  # json_object mode: the schema goes in words
                messages = with_schema_instruction(messages, request.response_schema.schema)
                kwargs["response_format"] = {"type": "json_object"}
            kwargs["messages"] = wire_messages(messages)
            tools = wire_tools(request)
            if tools.get("tool_choice") == "required":  # DashScope knows auto, none and a name
                tools["tool_choice"] = "auto"
            kwargs.update(tools)
        else:
            kwargs["prompt"] = request.prompt
        if s.top_k > 0:
            kwargs["top_k"] = s.top_k
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if s.repeat_penalty != 1.0:
            kwargs["repetition_penalty"] = s.repeat_penalty
        if self.workspace:
            kwargs["workspace"] = self.workspace
        if self.base_url:
            kwargs["base_address"] = self.base_url
        return kwargs

    def _attempt(self, kwargs: dict[str, Any], start: float) -> Iterator[Chunk]:
        """One HTTP request: stream its text as chunks, then the final chunk with the Completion."""
        answer = _Answer(start, self._status_error)
        with self._errors_mapped(answer), closing(_sdk().Generation.call(**kwargs)) as responses:
            for rsp in responses:
                text = answer.take(rsp)
                if text:
                    yield Chunk(text)
        yield self._final(answer)

    async def _aattempt(self, kwargs: dict[str, Any], start: float) -> AsyncIterator[Chunk]:
        """``_attempt`` through ``AioGeneration`` on this loop's aiohttp session."""
        answer = _Answer(start, self._status_error)
        with self._errors_mapped(answer):
            session = await self._aclients.get()
            call = _sdk().AioGeneration.call(**kwargs, session=session)
            async with aclosing(await call) as responses:
                async for rsp in responses:
                    text = answer.take(rsp)
                    if text:
                        yield Chunk(text)
        yield self._final(answer)

    @contextmanager
    def _errors_mapped(self, answer: _Answer) -> Iterator[None]:
        """The one place SDK/HTTP exceptions, sync or async, become the library's errors."""
        try:
            yield
        except TongyiError:
            raise
        except Exception as exc:
            if not (isinstance(exc, _understood()) or _raised_in_sdk(exc)):
                raise  # our own bug: not dressed up as advice about the server
            raise self._exception_error(exc, answer.request_id) from exc

    def _final(self, answer: _Answer) -> Chunk:
        """The last chunk, carrying the Completion; a stream cut before its end is an error."""
        if answer.raw_finish is None:
            raise RemoteConnectionError(
                f"{self.name}: the stream ended before DashScope said it was finished; "
                "the connection may have been cut, try again", backend=self.name,
                request_id=answer.request_id)
        with self._errors_mapped(answer):  # usage of the wrong shape is a protocol error
            completion = answer.completion(self.name)
        return Chunk("", finish_reason=completion.finish_reason, completion=completion)

    def _status_error(self, rsp: Any) -> RemoteError:
        status = int(rsp.status_code or 0)
        code = str(getattr(rsp, "code", "") or "")
        message = short(redact(str(getattr(rsp, "message", "") or "")))
        headers = getattr(rsp, "headers", None) or {}
        ctype = str({k.lower(): v for k, v in headers.items()}.get("content-type", ""))
        common = {"backend": self.name, "status": status, "request_id": rsp.request_id}
        if code == "Unknown" and "text/event-stream" in ctype:
            return ResponseFormatError(
                f"{self.name}: the server at {self._url()} sent a stream event that is not JSON; "
                "check that base_url points at a DashScope API", **common)
        if status in (401, 403) or code in ("InvalidApiKey", "AccessDenied"):
            return AuthenticationError(
                f"{self.name}: DashScope rejected the API key ({status} {code}: {message}); check "
                f"{self.api_key_env or 'api_key'} and that the key may use model {self.model!r}",
                **common)
        if status == 429 or code.startswith("Throttling"):
            return RateLimitError(
                f"{self.name}: DashScope is throttling requests ({status} {code}: {message}); "
                "wait, lower the request rate or raise the quota", **common,
                retry_after_s=retry_after(headers))
        if status >= 500:
            return ServerError(
                f"{self.name}: DashScope failed ({status} {code}: {message}); try again later "
                "or configure a fallback", **common, retry_after_s=retry_after(headers))
        if 400 <= status < 500:
            return RemoteRequestError(
                f"{self.name}: DashScope rejected the request ({status} {code}: {message}); "
                f"check the model name {self.model!r} and the request options", **common)
        return RemoteError(f"{self.name}: unexpected status {status} ({code}: {message})", **common)

    def _exception_error(self, e: Exception, request_id: str | None) -> RemoteError:
        """An exception from the SDK (requests underneath the sync API, aiohttp underneath
        ``AioGeneration``) as the library's error: the one mapping for both."""
        where = self._url()
        common = {"backend": self.name, "request_id": request_id}
        kind = type(e).__name__
        errors = _transport_errors()
        if isinstance(e, errors["timeout"]) or "timed out" in str(e).lower():
            return RemoteTimeoutError(
                f"{self.name}: no answer from {where} within {self.timeout_s:g} s ({kind}); "
                "raise timeout_s or check the network", **common)
        if isinstance(e, errors["dropped"]):
            return RemoteConnectionError(
                f"{self.name}: the connection to {where} dropped mid-answer ({kind}); try again",
                **common)
        if isinstance(e, errors["bad_url"]):
            return RemoteRequestError(f"{self.name}: base_url {where!r} is not a valid URL "
                                      "(expected e.g. https://dashscope.aliyuncs.com/api/v1)",
                                      **common)
        if isinstance(e, errors["unreachable"]):
            return RemoteConnectionError(
                f"{self.name}: cannot reach DashScope at {where} ({kind}); check the network, "
                "proxy settings and base_url", **common)
        if isinstance(e, (NotProtocol, json.JSONDecodeError, UnicodeDecodeError)) or (
                isinstance(e, (TypeError, KeyError, AttributeError, ValueError))
                and _raised_in_sdk(e)):
            return ResponseFormatError(
                f"{self.name}: the answer from {where} is not DashScope's format ({kind}); check "
                "that base_url points at a DashScope API", **common)
        return RemoteError(f"{self.name}: request to {where} failed ({kind}: "
                           f"{short(redact(str(e)), 200)})", **common)


class _Answer(StreamedAnswer):
    """What one DashScope answer has accumulated from the SDK's stream events: the one parser,
    fed by the sync and the async attempt alike. ``rejected`` turns an event with a non-200
    status into the exception to raise."""

    PROMPT_KEY = "input_tokens"
    COMPLETION_KEY = "output_tokens"

    def __init__(self, start: float, rejected: Callable[[Any], RemoteError]) -> None:
        super().__init__(StreamClock(start))
        self.rejected = rejected
        self.request_id: str | None = None

    def take(self, rsp: Any) -> str:
        """Absorb one SDK response event; return its new text."""
        self.request_id = getattr(rsp, "request_id", None) or self.request_id
        if rsp.status_code != 200:
            raise self.rejected(rsp)
        text, deltas, fin = _parse_output(as_mapping(rsp.output, "output"))
        self.usage = as_mapping(rsp.usage, "usage") or self.usage
        if self.tools.add(deltas):
            self.clock.piece()
        if fin not in (None, "", "null"):
            self.raw_finish = fin
        return self.add_text(text) if text else text


def _raised_in_sdk(exc: BaseException) -> bool:
    """Whether the SDK's own code raised ``exc`` (e.g. its TypeError on an answer without
    ``output``): the SDK failing on the server's answer, which the edge maps."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"{os.sep}dashscope{os.sep}" in last.tb_frame.f_code.co_filename


def _understood() -> tuple[type[BaseException], ...]:
    """What the edge maps: the SDK's own errors, its transports' (requests, aiohttp), and an
    answer that is not the protocol. Anything else is a bug and propagates as it is."""
    import aiohttp
    import requests
    from dashscope.common.error import DashScopeException

    return (DashScopeException, requests.exceptions.RequestException, aiohttp.ClientError,
            TimeoutError, NotProtocol, json.JSONDecodeError, UnicodeDecodeError)


def _transport_errors() -> dict[str, tuple[type[BaseException], ...]]:
    """The SDK's transport exceptions by what they mean, for requests (the sync API) and
    aiohttp (``AioGeneration``). Timeouts first: some are also connection errors."""
    import aiohttp
    import requests

    rex = requests.exceptions
    return {"timeout": (rex.Timeout, TimeoutError),
            "dropped": (rex.ChunkedEncodingError, aiohttp.ClientPayloadError),
            "bad_url": (rex.InvalidURL, rex.MissingSchema, rex.InvalidSchema, aiohttp.InvalidURL),
            "unreachable": (rex.ConnectionError, aiohttp.ClientConnectionError)}


def _aio_session() -> Any:
    """An aiohttp session for ``AioGeneration``, made as the SDK makes its shared one (certifi's
    CA bundle, proxies from the environment), but owned by us so that it is closed."""
    import ssl

    import aiohttp
    import certifi

    context = ssl.create_default_context(cafile=certifi.where())
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), trust_env=True)


def _parse_output(output: Mapping[str, Any]) -> tuple[str, list[Any], object]:
    """(text delta, tool-call deltas, finish reason) from one DashScope stream event."""
    choices = as_list(output.get("choices"), "choices")
    if choices:
        choice = as_mapping(choices[0], "a choice")
        message = as_mapping(choice.get("message"), "a choice's message")
        content = message.get("content")
        return (content if isinstance(content, str) else "",
                as_list(message.get("tool_calls"), "tool_calls"), choice.get("finish_reason"))
    text = output.get("text")
    return text if isinstance(text, str) else "", [], output.get("finish_reason")
