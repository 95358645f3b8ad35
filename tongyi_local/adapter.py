"""Drop-in model layer for agent code written against an ``ITextGenerator`` interface.

    provider = tongyi_local.create_provider("tongyi-local")      # or "tongyi", "mock"
    text = await provider.generate("Write binary search.", max_tokens=256, role="coder")
    text = await provider.generate_with_tools("Weather in Paris?", [weather_tool])
    # -> 'TOOL_CALL: get_weather({"city": "Paris"})' when the model calls the tool

Why: multi-agent programs already speak this interface (``generate``, ``generate_with_tools``,
``health_check``, ``close``, all async), once implemented over HTTP against a llama.cpp server.
``TextGeneratorAdapter`` implements it in-process over any ``Generator``, role-aware: the
``role=`` keyword picks that role's model, system prompt, sampling, fallback and privacy rule from
models.toml. Tool calls come back in the ``TOOL_CALL: name({json})`` lines those agents parse;
``complete_with_tools`` returns the typed ``Completion`` instead.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidRequestError, TongyiError
from .types import Completion, Generator

PROVIDERS = ("mock", "tongyi", "tongyi-local")
_SAMPLING_KEYS = ("top_p", "top_k", "min_p", "repeat_penalty", "seed")


class TextGeneratorAdapter:
    """``ITextGenerator`` over a ``Generator`` (or over roles from models.toml)."""

    def __init__(self, generator: Generator | None = None, *, role: str = "default",
                 config_path: str | Path | None = None, profile: str | None = None,
                 for_role: Callable[[str], Generator] | None = None) -> None:
        if generator is None and for_role is None:
            from .registry import Registry

            registry = Registry(config_path=config_path, profile=profile)
            for_role = registry.for_role
        self._fixed = generator
        self._for_role = for_role
        self.role = role
        self._by_role: dict[str, Generator] = {}

    def generator(self, role: str | None = None) -> Generator:
        """The generator a call goes to: the fixed one, else the role's (built once)."""
        if self._fixed is not None:
            return self._fixed
        name = role or self.role
        if name not in self._by_role:
            self._by_role[name] = self._for_role(name)  # type: ignore[misc]
        return self._by_role[name]

    async def generate(self, prompt: str, max_tokens: int = 512, temperature: float = 0.7,
                       stop: Sequence[str] | None = None, **kwargs: Any) -> str:
        """The model's answer to ``prompt`` as a user turn (``role=``, ``system=`` and the
        sampling options ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty``, ``seed``)."""
        completion = await self._chat(prompt, max_tokens, temperature, stop, kwargs)
        return completion.text

    async def generate_with_tools(self, prompt: str, tools: Sequence[Mapping[str, Any] | Any],
                                  **kwargs: Any) -> str:
        """The answer, with each tool call as a ``TOOL_CALL: name({json args})`` line."""
        return format_tool_calls(await self.complete_with_tools(prompt, tools, **kwargs))

    async def complete_with_tools(self, prompt: str, tools: Sequence[Mapping[str, Any] | Any],
                                  **kwargs: Any) -> Completion:
        """The typed form: a ``Completion`` with ``tool_calls``."""
        max_tokens = kwargs.pop("max_tokens", 512)
        temperature = kwargs.pop("temperature", 0.7)
        stop = kwargs.pop("stop", None)
        return await self._chat(prompt, max_tokens, temperature, stop, kwargs, tools=tools)

    async def health_check(self) -> bool:
        """True when the model (or the role's route) can answer; never raises."""
        generator = self.generator()
        check = getattr(generator, "health", None)
        try:
            if check is not None:
                return bool(await asyncio.to_thread(check))
            await generator.acomplete("ping", max_tokens=1)
            return True
        except TongyiError:
            return False

    async def close(self) -> None:
        for generator in {id(g): g for g in [self._fixed, *self._by_role.values()] if g}.values():
            generator.close()
        self._by_role.clear()

    async def _chat(self, prompt: str, max_tokens: int, temperature: float,
                    stop: Sequence[str] | None, kwargs: dict[str, Any],
                    tools: Sequence[Any] | None = None) -> Completion:
        role = kwargs.pop("role", None)
        system = kwargs.pop("system", None) or kwargs.pop("system_prompt", None)
        tool_choice = kwargs.pop("tool_choice", None)
        unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
        if unknown:
            raise InvalidRequestError(f"unknown option(s) {', '.join(unknown)}; known: max_tokens, "
                              f"temperature, stop, role, system, tool_choice, "
                              f"{', '.join(_SAMPLING_KEYS)}")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        extra = {"tools": tools, "tool_choice": tool_choice} if tools else {}
        return await self.generator(role).achat(
            messages, max_tokens=max_tokens, temperature=temperature,
            stop=tuple(stop) if stop else None, **extra, **kwargs)


def format_tool_calls(completion: Completion) -> str:
    """Text, then one ``TOOL_CALL: name({json args})`` line per call."""
    lines = [completion.text] if completion.text else []
    lines += [f"TOOL_CALL: {c.name}({c.arguments_json})" for c in completion.tool_calls]
    return "\n".join(lines)


def create_provider(provider_type: str, **options: Any) -> TextGeneratorAdapter:
    """The provider a multi-agent program asks for by name:

    - ``"mock"``: scripted (``FakeGenerator``; ``replies=``, ``default=``), for tests;
    - ``"tongyi"``: DashScope (``model=``, default ``qwen-plus``); ``DASHSCOPE_API_KEY`` must be set;
    - ``"tongyi-local"``: in-process and role-aware (``role=``, ``config_path=``, ``profile=``;
      each role's fallback and privacy apply), or, when ``LLAMA_CPP_URL`` is set, the
      OpenAI-compatible server there (``model=``).
    """
    if provider_type == "mock":
        from .backends.fake import FakeGenerator

        return TextGeneratorAdapter(FakeGenerator(
            options.get("replies", ()), default=options.get("default", "mock response")))
    if provider_type == "tongyi":
        from .backends.dashscope import DashScopeGenerator
        from .backends.remote import resolve_key

        key_env = options.get("api_key_env", "DASHSCOPE_API_KEY")
        resolve_key(None, key_env, "tongyi provider", required=True)  # missing key: fail now
        return TextGeneratorAdapter(DashScopeGenerator(options.get("model", "qwen-plus"),
                                                       api_key_env=key_env))
    if provider_type == "tongyi-local":
        url = os.environ.get("LLAMA_CPP_URL", "").strip()
        if url:
            from .backends.openai import OpenAIGenerator

            base = url.rstrip("/")
            base = base if base.endswith("/v1") else base + "/v1"
            return TextGeneratorAdapter(OpenAIGenerator(options.get("model", "local"),
                                                        base_url=base, name="llama-server"))
        return TextGeneratorAdapter(role=options.get("role", "default"),
                                    config_path=options.get("config_path"),
                                    profile=options.get("profile"))
    raise ConfigError(f"unknown provider {provider_type!r}; use one of {', '.join(PROVIDERS)}")
