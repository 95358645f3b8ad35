"""Backends: the only modules that import an inference SDK. Imported lazily by their users."""

from __future__ import annotations

from typing import Any


def remote_from_spec(spec: Any, sampling: Any) -> Any:
    """The generator for a non-llama models.toml entry (dashscope, openai or fake)."""
    if spec.backend == "dashscope":
        from .dashscope import DashScopeGenerator

        return DashScopeGenerator(spec.model_id, api_key_env=spec.api_key_env,
                                  base_url=spec.base_url, timeout_s=spec.timeout_s,
                                  sampling=sampling, name=spec.name)
    if spec.backend == "openai":
        from .openai import OpenAIGenerator

        return OpenAIGenerator(spec.model_id, base_url=spec.base_url,
                               api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
                               sampling=sampling, name=spec.name, remote=spec.remote)
    from .fake import FakeGenerator

    return FakeGenerator(spec.replies, name=spec.name, sampling=sampling, remote=spec.remote)
