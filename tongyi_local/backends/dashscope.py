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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import (AuthenticationError, BackendUnavailableError, ConfigError,
                      InvalidRequestError, RateLimitError, RemoteConnectionError, RemoteError,
                      RemoteRequestError, RemoteTimeoutError, ResponseFormatError, ServerError,
                      TongyiError)
from ..types import Chunk, Request, Sampling
from .base import BaseGenerator
from .remote import (Secret, StreamClock, ToolCallAssembler, coerce_sampling, redact,
                     resolve_key, retry_after, short, wire_messages)
from .retry import RetryPolicy, retrying_stream

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


class DashScopeGenerator(BaseGenerator):
    """Qwen models on DashScope, with the same results as the local backend."""

    remote = True

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

    def __repr__(self) -> str:
        key = "set" if self._api_key else f"from ${self.api_key_env}"
        return (f"DashScopeGenerator(model={self.model!r}, base_url={self._url()!r}, "
                f"api_key=<{key}>)")

    # --- the backend -------------------------------------------------------------------------
    def _generate(self, request: Request) -> Iterator[Chunk]:
        key = self._key()  # before any request: a missing key is a clear error now
        if request.prompt is not None and not request.prompt.strip():
            raise InvalidRequestError(f"{self.name}: the prompt is empty")
        kwargs = self._call_kwargs(request, key)
        clock = StreamClock()
        return retrying_stream(self.retry, lambda: self._attempt(kwargs, clock.start),
                               backend=self.name)

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
            kwargs["messages"] = wire_messages(request.messages)
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
        if request.tools:
            kwargs["tools"] = [dict(t) for t in request.tools]
        if self.workspace:
            kwargs["workspace"] = self.workspace
        if self.base_url:
            kwargs["base_address"] = self.base_url
        return kwargs

    def _attempt(self, kwargs: dict[str, Any], start: float) -> Iterator[Chunk]:
        """One HTTP request: stream its text as chunks, then the final chunk with the Completion."""
        sdk = _sdk()
        clock = StreamClock(start)
        tools = ToolCallAssembler()
        parts: list[str] = []
        usage: Mapping[str, Any] = {}
        raw_finish: object = None
        request_id = None
        responses = None
        try:
            responses = sdk.Generation.call(**kwargs)
            for rsp in responses:
                request_id = getattr(rsp, "request_id", None) or request_id
                if rsp.status_code != 200:
                    raise self._status_error(rsp)
                output = rsp.output or {}
                text, deltas, fin = _parse_output(output)
                usage = rsp.usage or usage
                if tools.add(deltas):
                    clock.piece()
                if fin not in (None, "", "null"):
                    raw_finish = fin
                if text:
                    clock.piece()
                    parts.append(text)
                    yield Chunk(text)
        except TongyiError:
            raise
        except Exception as e:  # noqa: BLE001 - the one place SDK/HTTP errors are mapped
            raise self._exception_error(e, request_id) from None
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()
        if raw_finish is None:
            raise RemoteConnectionError(
                f"{self.name}: the stream ended before DashScope said it was finished; "
                "the connection may have been cut, try again", backend=self.name,
                request_id=request_id)
        details = usage.get("prompt_tokens_details") or {}
        completion = clock.completion(
            text="".join(parts), raw_finish=raw_finish, tool_calls=tools.calls(),
            prompt_tokens=usage.get("input_tokens"), completion_tokens=usage.get("output_tokens"),
            cached_tokens=int(details.get("cached_tokens") or 0), model=self.name)
        yield Chunk("", finish_reason=completion.finish_reason, completion=completion)

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
        import requests

        where = self._url()
        common = {"backend": self.name, "request_id": request_id}
        kind = type(e).__name__
        if isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e).lower():
            return RemoteTimeoutError(
                f"{self.name}: no answer from {where} within {self.timeout_s:g} s ({kind}); "
                "raise timeout_s or check the network", **common)
        if isinstance(e, requests.exceptions.ChunkedEncodingError):
            return RemoteConnectionError(
                f"{self.name}: the connection to {where} dropped mid-answer ({kind}); try again",
                **common)
        if isinstance(e, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                          requests.exceptions.InvalidSchema)):
            return RemoteRequestError(f"{self.name}: base_url {where!r} is not a valid URL "
                                      "(expected e.g. https://dashscope.aliyuncs.com/api/v1)",
                                      **common)
        if isinstance(e, requests.exceptions.ConnectionError):
            return RemoteConnectionError(
                f"{self.name}: cannot reach DashScope at {where} ({kind}); check the network, "
                "proxy settings and base_url", **common)
        if isinstance(e, (ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError)):
            return ResponseFormatError(
                f"{self.name}: the answer from {where} is not DashScope's format ({kind}); check "
                "that base_url points at a DashScope API", **common)
        return RemoteError(f"{self.name}: request to {where} failed ({kind}: "
                           f"{short(redact(str(e)), 200)})", **common)


def _parse_output(output: Mapping[str, Any]) -> tuple[str, list[Any], object]:
    """(text delta, tool-call deltas, finish reason) from one DashScope stream event."""
    choices = output.get("choices") or []
    if choices:
        choice = choices[0] or {}
        message = choice.get("message") or {}
        content = message.get("content")
        return (content if isinstance(content, str) else "",
                list(message.get("tool_calls") or []), choice.get("finish_reason"))
    text = output.get("text")
    return text if isinstance(text, str) else "", [], output.get("finish_reason")
