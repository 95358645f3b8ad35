"""The roles and models of models.toml as models of simonw's ``llm`` (CLI and library).

    llm -m tongyi-local/coder "Write a haiku about caches" -o temperature 0
    llm chat -m tongyi-local/default

Why a plugin: ``llm`` users get the library's roles (system prompt, sampling, fallback, privacy)
and its pool of loaded models under their usual commands, with conversations and token usage
logged by ``llm`` itself. Each role and each model entry becomes ``tongyi-local/<name>``, answered
by the same generator the OpenAI API gives for that name (``OpenAIApp.generator``).

Registering reads models.toml only; a model is loaded on the first prompt that needs it. A
models.toml that does not load must not take ``llm``'s other models down with it, so it is
reported once as a warning and nothing is registered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import llm
from llm.parts import ReasoningPart, TextPart
from pydantic import Field, ValidationInfo, field_validator

from .errors import TongyiError
from .types import Completion, Message, Sampling

if TYPE_CHECKING:
    from .openai_api import OpenAIApp

# Outside the library's logger tree (which has a NullHandler): the llm CLI configures no logging,
# so its warnings reach stderr through logging's last-resort handler; applications that configure
# logging get them like any other record.
log = logging.getLogger("llm_tongyi_local")

PREFIX = "tongyi-local/"

_warned = False  # a models.toml that does not load is reported once per process


@functools.cache
def _shared_app() -> OpenAIApp:
    """One application per process: the default registry and pool, one generator per name (a
    failed load is not cached: the next call tries again)."""
    from .openai_api import OpenAIApp

    return OpenAIApp()


def model_names() -> list[tuple[str, str]]:
    """(name, "role" or "model") to register, roles first; none when models.toml does not load."""
    global _warned
    try:
        app = _shared_app()
        roles = app.registry.config.roles
        return [(name, "role" if name in roles else "model") for name in app.model_names()]
    except TongyiError as exc:
        if not _warned:
            _warned = True
            log.warning("tongyi-local: no models registered with llm, because models.toml does "
                        "not load: %s", exc)
        return []


@llm.hookimpl
def register_models(register: Any) -> None:
    for name, kind in model_names():
        register(TongyiModel(name, kind), TongyiAsyncModel(name, kind))


class TongyiOptions(llm.Options):
    """Sampling for one prompt; an option left out keeps the role's or model's value."""

    temperature: float | None = Field(
        None, description="Sampling temperature, >= 0; 0 is greedy (deterministic)")
    top_p: float | None = Field(None, description="Nucleus sampling: keep the smallest set of "
                                                  "tokens whose probability reaches top_p, (0, 1]")
    top_k: int | None = Field(None, description="Sample from the top_k most likely tokens; "
                                                "0 disables it")
    max_tokens: int | None = Field(None, description="Most tokens to generate, >= 1")
    seed: int | None = Field(None, description="Random seed for repeatable sampling, >= 0")
    stop: str | list[str] | None = Field(None, description="Stop generating at this text")

    @field_validator("temperature", "top_p", "top_k", "max_tokens", "seed", "stop")
    @classmethod
    def _checked_by_sampling(cls, value: Any, info: ValidationInfo) -> Any:
        # Sampling's own checks, so llm reports the library's message under the option's name
        # (InvalidRequestError is a ValueError, which pydantic turns into a validation error).
        if value is not None:
            Sampling(**{info.field_name: value})
        return value

    def sampling(self) -> dict[str, Any]:
        """The options given, as ``Generator`` keyword arguments."""
        return self.model_dump(exclude_none=True)


class _TongyiModelBase:
    """What the sync and the async model share: the name and the prompt's translation."""

    can_stream = True
    Options = TongyiOptions

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.model_id = PREFIX + name

    def __str__(self) -> str:  # what `llm models list` shows
        face = " (async)" if isinstance(self, llm.AsyncModel) else ""
        return f"tongyi-local {self.kind}{face}: {self.model_id}"

    def _request(self, prompt: llm.Prompt) -> tuple[list[Message], dict[str, Any]]:
        return chat_messages(prompt), prompt.options.sampling()


class TongyiModel(_TongyiModelBase, llm.Model):
    def execute(self, prompt: llm.Prompt, stream: bool, response: llm.Response,
                conversation: llm.Conversation | None) -> Iterator[str]:
        completion: Completion | None = None
        try:
            messages, options = self._request(prompt)
            generator = _shared_app().generator(self.name)
            if stream:
                with contextlib.closing(generator.stream(messages, **options)) as chunks:
                    for chunk in chunks:
                        if chunk.text:
                            yield chunk.text
                        completion = chunk.completion or completion
            else:
                completion = generator.chat(messages, **options)
                yield completion.text
        except TongyiError as exc:
            raise llm.ModelError(str(exc)) from exc
        record_usage(response, completion)


class TongyiAsyncModel(_TongyiModelBase, llm.AsyncModel):
    async def execute(self, prompt: llm.Prompt, stream: bool, response: llm.AsyncResponse,
                      conversation: llm.AsyncConversation | None) -> AsyncIterator[str]:
        completion: Completion | None = None
        try:
            messages, options = self._request(prompt)
            generator = _shared_app().generator(self.name)
            if stream:
                chunks = generator.astream(messages, **options)
                try:
                    async for chunk in chunks:
                        if chunk.text:
                            yield chunk.text
                        completion = chunk.completion or completion
                finally:
                    await chunks.aclose()
            else:
                completion = await generator.achat(messages, **options)
                yield completion.text
        except TongyiError as exc:
            raise llm.ModelError(str(exc)) from exc
        record_usage(response, completion)


def chat_messages(prompt: llm.Prompt) -> list[Message]:
    """The whole chain ``llm`` hands over (system prompt, earlier turns, this prompt) as the
    library's messages; reasoning is not sent back, anything but text is refused."""
    messages = []
    for message in prompt.messages:
        texts = []
        for part in message.parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif not isinstance(part, ReasoningPart):
                raise llm.ModelError(f"{prompt.model.model_id} takes text only, not "
                                     f"{type(part).__name__} in a {message.role} message")
        messages.append(Message(message.role, "".join(texts)))
    return messages


def record_usage(response: llm.Response | llm.AsyncResponse,
                 completion: Completion | None) -> None:
    """Token counts for llm's log; which model answered (a role's fallback may have)."""
    if completion is None:
        return
    usage = completion.usage
    response.set_usage(input=usage.prompt_tokens, output=usage.completion_tokens,
                       details={"cached_prompt_tokens": usage.cached_prompt_tokens}
                       if usage.cached_prompt_tokens else None)
    if completion.model:
        response.set_resolved_model(completion.model)
