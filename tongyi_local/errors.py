"""The library's one exception tree. Lower-level errors (ctypes, OS, HTTP) are mapped onto it once,
at the edge that meets them, so callers catch ``TongyiError`` and nothing else.

    TongyiError
    ├── ConfigError (ValueError)          bad models.toml, unknown role/model, bad setting
    ├── InvalidRequestError (ValueError)  bad sampling values, empty prompt, bad messages, bad tools
    │   ├── ContextOverflowError          prompt (plus requested tokens) longer than the context
    │   └── UnsupportedSchemaError        a JSON schema uses a feature the grammar cannot express
    ├── ModelError
    │   ├── ModelNotFoundError (FileNotFoundError)  no file where the model should be
    │   ├── ModelLoadError                file present but unreadable/not GGUF/rejected by llama.cpp
    │   ├── InsufficientMemoryError (MemoryError)  the model does not fit the RAM budget
    │   └── ChecksumError                 a file's sha256 is not the expected one
    ├── DownloadError                     a hub pull failed (network, HTTP status, not on the hub,
    │                                     or offline mode with no local copy: ``.offline``)
    ├── BackendError                      the runtime failed while generating
    │   ├── BackendUnavailableError       runtime not installed/built (e.g. llama_cpp missing)
    │   ├── OutputParseError              a tool call or structured answer did not parse/validate
    │   └── RemoteError                   a remote backend (DashScope, OpenAI-compatible) failed
    │       ├── AuthenticationError (PermissionError)  API key missing or rejected; never retried
    │       ├── RemoteRequestError (InvalidRequestError)  the server rejected the request (4xx)
    │       ├── RateLimitError            429 / throttled, after the retries ran out
    │       ├── ServerError               5xx (e.g. 503 overloaded), after the retries ran out
    │       ├── RemoteTimeoutError (TimeoutError)  no answer within timeout_s, after the retries
    │       ├── RemoteConnectionError (ConnectionError)  unreachable, or the connection dropped
    │       └── ResponseFormatError       the answer was not the protocol (malformed JSON, ...)
    ├── PrivacyError                      a local-only role would have reached a remote backend
    ├── BuildError                        building llama-cpp-python or llama.cpp's tools failed
    ├── QuantizeError                     llama.cpp could not quantize a model file
    ├── EvidenceError                     benchmark/quality/report inputs unusable (corpus, results)
    └── GeneratorClosedError              the generator was used after close()

Messages name the input at fault and what to do about it; they never contain prompt text.
Remote errors are raised only by the remote backends, which map SDK and HTTP exceptions once;
``retryable`` tells the shared retry policy (``backends/retry.py``) what may be tried again.
"""

from __future__ import annotations


class TongyiError(Exception):
    """Root of every error the library raises on purpose."""


class ConfigError(TongyiError, ValueError):
    """Configuration (models.toml, environment, arguments) is invalid."""


class InvalidRequestError(TongyiError, ValueError):
    """A request's own values are invalid; raised before any work is done."""


class ContextOverflowError(InvalidRequestError):
    """The prompt does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, context_tokens: int, detail: str = "") -> None:
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        msg = (f"prompt is {prompt_tokens} tokens but the context holds {context_tokens}"
               f"{detail}; shorten the prompt or load the model with a larger n_ctx")
        super().__init__(msg)


class UnsupportedSchemaError(InvalidRequestError):
    """A JSON schema uses a feature that constrained decoding cannot express.

    ``feature`` is the keyword (e.g. ``"not"``), ``pointer`` the JSON pointer of the schema node
    that uses it (``""`` for the root), so the caller can find and change it.
    """

    def __init__(self, feature: str, pointer: str, detail: str = "") -> None:
        self.feature, self.pointer = feature, pointer
        where = pointer or "/"
        super().__init__(f"JSON schema feature {feature!r} at {where} is not supported by "
                         f"constrained decoding{detail}; remove it or validate it in your code")


class ModelError(TongyiError):
    """A model file could not be found or loaded."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """No model file at the expected place."""


class ModelLoadError(ModelError):
    """The model file exists but cannot be loaded."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load model {self.path}: {reason}")


class InsufficientMemoryError(ModelError, MemoryError):
    """Loading the model would exceed the pool's memory budget."""


class ChecksumError(ModelError):
    """A file's sha256 is not the expected one (a pulled file is deleted, never placed)."""

    def __init__(self, what: object, expected: str, actual: str, advice: str) -> None:
        self.what, self.expected, self.actual = str(what), expected, actual
        super().__init__(f"sha256 mismatch for {self.what}: expected {expected}, got {actual}; "
                         f"{advice}")


class DownloadError(TongyiError):
    """Pulling a file from the hub failed; ``offline`` is true when offline mode stopped it."""

    def __init__(self, source: str, reason: str, *, offline: bool = False) -> None:
        self.source, self.reason, self.offline = source, reason, offline
        super().__init__(f"cannot download {source}: {reason}")


class BackendError(TongyiError):
    """The inference runtime failed while serving a request."""


class BackendUnavailableError(BackendError):
    """The runtime a backend needs is not installed or not built."""


class OutputParseError(BackendError):
    """The model's answer was not the tool call or structured value the request asked for."""


class RemoteError(BackendError):
    """A remote backend failed; carries the backend name, HTTP status and server request id.

    Messages name the backend and what to do; they never contain the API key or prompt text.
    """

    retryable = False

    def __init__(self, message: str, *, backend: str = "", status: int | None = None,
                 request_id: str | None = None, retry_after_s: float | None = None) -> None:
        self.message = message
        self.backend = backend
        self.status = status
        self.request_id = request_id or None
        self.retry_after_s = retry_after_s
        self.attempts = 1
        super().__init__(message)

    def __str__(self) -> str:
        text = self.message
        if self.request_id:
            text += f" [request id {self.request_id}]"
        if self.attempts > 1:
            text += f" (gave up after {self.attempts} attempts)"
        return text


class AuthenticationError(RemoteError, PermissionError):
    """The API key is missing or the server rejected it (401/403); retrying cannot help."""


class RemoteRequestError(RemoteError, InvalidRequestError):
    """The server rejected the request itself (400, 404 unknown model, 413, 422)."""


class RateLimitError(RemoteError):
    """The server throttled us (429) through every retry."""

    retryable = True


class ServerError(RemoteError):
    """The server failed (5xx, e.g. 503 overloaded) through every retry."""

    retryable = True


class RemoteTimeoutError(RemoteError, TimeoutError):
    """No answer (or no next piece of a stream) within the backend's ``timeout_s``."""

    retryable = True


class RemoteConnectionError(RemoteError, ConnectionError):
    """The endpoint could not be reached, or the connection dropped mid-answer."""

    retryable = True


class ResponseFormatError(RemoteError):
    """The server answered, but not in its protocol (malformed JSON, missing fields)."""


class PrivacyError(TongyiError):
    """A role marked ``privacy = "local-only"`` would have sent its request to a remote backend."""


class BuildError(TongyiError):
    """Building the llama.cpp runtime or its tools failed."""


class QuantizeError(TongyiError):
    """llama.cpp's quantizer rejected or failed on a model file."""


class EvidenceError(TongyiError):
    """An input of the evidence pipeline (corpus, results file, tool output) is unusable."""


class GeneratorClosedError(TongyiError):
    """The generator was used after ``close()``."""
