"""The library's one exception tree. Lower-level errors (ctypes, OS, HTTP) are mapped onto it once,
at the edge that meets them, so callers catch ``TongyiError`` and nothing else.

    TongyiError
    ├── ConfigError (ValueError)          bad models.toml, unknown role/model, bad setting
    ├── InvalidRequestError (ValueError)  bad sampling values, empty prompt, bad messages
    │   └── ContextOverflowError          prompt (plus requested tokens) longer than the context
    ├── ModelError
    │   ├── ModelNotFoundError (FileNotFoundError)  no file where the model should be
    │   ├── ModelLoadError                file present but unreadable/not GGUF/rejected by llama.cpp
    │   └── InsufficientMemoryError (MemoryError)  the model does not fit the RAM budget
    ├── BackendError                      the runtime failed while generating
    │   └── BackendUnavailableError       runtime not installed/built (e.g. llama_cpp missing)
    ├── BuildError                        building llama-cpp-python or llama.cpp's tools failed
    └── GeneratorClosedError              the generator was used after close()

Messages name the input at fault and what to do about it; they never contain prompt text.
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


class BackendError(TongyiError):
    """The inference runtime failed while serving a request."""


class BackendUnavailableError(BackendError):
    """The runtime a backend needs is not installed or not built."""


class BuildError(TongyiError):
    """Building the llama.cpp runtime or its tools failed."""


class GeneratorClosedError(TongyiError):
    """The generator was used after ``close()``."""
