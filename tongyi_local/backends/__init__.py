"""Backends: the only modules that import an inference SDK. Imported lazily by their users.

``remote_generator`` is the one place a remote (or fake) generator is made from a backend name:
models.toml entries (``remote_from_spec``) and the CLI's ``--backend`` both come through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ..types import Generator, Sampling

REMOTE_BACKENDS = ("dashscope", "openai", "fake")
DASHSCOPE_DEFAULT_MODEL = "qwen-plus"


def remote_generator(backend: str, model: str | None = None, *, base_url: str | None = None,
                     api_key_env: str | None = None, timeout_s: float = 60.0,
                     sampling: Sampling | None = None, name: str | None = None,
                     remote: bool | None = None, replies: Iterable[Any] = ()) -> Generator:
    """The generator of a non-llama backend. ``model`` is the server's model name (dashscope:
    default ``qwen-plus``; openai: required, with ``base_url``); ``remote=None`` keeps the
    backend's own default (dashscope and openai: remote; fake: local); ``replies`` feed ``fake``."""
    if backend == "dashscope":
        from .dashscope import DashScopeGenerator

        return DashScopeGenerator(model or DASHSCOPE_DEFAULT_MODEL, api_key_env=api_key_env,
                                  base_url=base_url, timeout_s=timeout_s, sampling=sampling,
                                  name=name)
    extra = {} if remote is None else {"remote": remote}
    if backend == "openai":
        from .openai import OpenAIGenerator

        return OpenAIGenerator(model, base_url=base_url, api_key_env=api_key_env,
                               timeout_s=timeout_s, sampling=sampling, name=name, **extra)
    if backend == "fake":
        from .fake import FakeGenerator

        return FakeGenerator(replies, name=name or "fake", sampling=sampling, **extra)
    raise ConfigError(f"unknown remote backend {backend!r}; use one of "
                      f"{', '.join(REMOTE_BACKENDS)} (or llama, for a model in-process)")


def remote_from_spec(spec: Any, sampling: Sampling) -> Generator:
    """The generator for a non-llama models.toml entry (a ``config.ModelSpec``)."""
    return remote_generator(spec.backend, spec.model_id, base_url=spec.base_url,
                            api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
                            sampling=sampling, name=spec.name, remote=spec.remote,
                            replies=spec.replies)
