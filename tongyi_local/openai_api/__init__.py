"""The OpenAI REST API on the library's own roles and models: an in-process httpx transport
(``openai_transport``) and an HTTP server (``tongyi-local serve``), both over ``OpenAIApp``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, overload

from ..config import Config
from .app import OpenAIApp, Reply
from .transport import AsyncOpenAITransport, OpenAITransport

__all__ = ["AsyncOpenAITransport", "OpenAIApp", "OpenAITransport", "Reply", "openai_transport"]


@overload
def openai_transport(config: Config | str | Path | None = ..., profile: str | None = ...,
                     *, asyncio: Literal[False] = ...) -> OpenAITransport: ...
@overload
def openai_transport(config: Config | str | Path | None = ..., profile: str | None = ...,
                     *, asyncio: Literal[True]) -> AsyncOpenAITransport: ...


def openai_transport(config: Config | str | Path | None = None, profile: str | None = None, *,
                     asyncio: bool = False) -> OpenAITransport | AsyncOpenAITransport:
    """An httpx transport answering the OpenAI API in this process (``asyncio=True``: for
    ``httpx.AsyncClient`` / ``openai.AsyncOpenAI``). ``model`` in a request names a role or a
    model of ``config`` (default: the models.toml the library finds)."""
    app = OpenAIApp(config, profile)
    return AsyncOpenAITransport(app) if asyncio else OpenAITransport(app)
