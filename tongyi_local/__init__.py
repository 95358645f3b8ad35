"""tongyi_local: Qwen/Tongyi GGUF models in-process through llama.cpp, behind one Generator protocol.

    import tongyi_local
    with tongyi_local.load() as model:            # the packaged starter model
        print(model.complete("Hello", max_tokens=16).text)
    coder = tongyi_local.for_role("coder")        # the model models.toml assigns to coders

Importing does no I/O and does not load llama.cpp; ``load`` does.
"""

from __future__ import annotations

import logging as _logging
from pathlib import Path as _Path
from typing import Any as _Any

from .errors import (BackendError, BackendUnavailableError, BuildError, ConfigError,
                     ContextOverflowError, GeneratorClosedError, InvalidRequestError,
                     ModelError, ModelLoadError, ModelNotFoundError, TongyiError)
from .types import (Chunk, Completion, Generator, Message, Sampling, Timings, ToolCall, Usage)

__version__ = "0.1.0"

__all__ = [
    "BackendError", "BackendUnavailableError", "BuildError", "Chunk", "Completion", "ConfigError",
    "ContextOverflowError", "Generator", "GeneratorClosedError", "InvalidRequestError", "Message",
    "ModelError", "ModelLoadError", "ModelNotFoundError", "Sampling", "Timings", "TongyiError",
    "ToolCall", "Usage", "for_role", "load", "starter_model_path", "__version__",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def starter_model_path() -> _Path:
    """The packaged starter model (Gemma 3 270M Q4_K_M), assembled and checked on first use."""
    from .store import starter_model

    return starter_model()


def load(model_path: str | _Path | None = None, **options: _Any) -> Generator:
    """Load a GGUF file in-process (default: the starter model). Options: see ``LlamaGenerator``."""
    from .backends.llama import LlamaGenerator

    return LlamaGenerator(model_path if model_path is not None else starter_model_path(), **options)


def for_role(role: str, *, config_path: str | _Path | None = None,
             profile: str | None = None) -> Generator:
    """A generator for an agent role; its model is loaded on first use through the pool."""
    from .registry import for_role as _for_role

    return _for_role(role, config_path=config_path, profile=profile)
