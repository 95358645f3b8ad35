"""Role -> model spec -> generator, through the pool.

Agent code asks for a role, not a file: ``for_role("coder")`` returns a cheap ``RoleGenerator``
that applies the role's system prompt and sampling, and checks the role's model out of the pool
for each request, so the model is loaded when first needed and may be evicted while idle. The
roles are those of the models.toml layers in force where it is called: the project's file is the
nearest ``models.toml`` from the working directory upward (see ``config``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .backends.base import BaseGenerator
from .config import Config, ModelSpec, RoleSpec, config_layers, load_config
from .errors import ConfigError, ModelNotFoundError
from .pool import ModelPool
from .types import Chunk, Generator, Message, Request, Sampling


def model_file(spec: ModelSpec) -> Path:
    """Where a local model's file is (the starter model is assembled on first use)."""
    from . import store

    if spec.source == "starter":
        return store.starter_model()
    if spec.source == "starter-chat":
        return store.starter_chat_model()
    if spec.source == "path":
        return Path(spec.path).expanduser()
    return store.hub_file_path(spec.repo, spec.file, spec.revision)


def _threads(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def load_model(spec: ModelSpec) -> Generator:
    """Make the generator a model entry describes (the pool's loader)."""
    sampling = Sampling().merged(spec.sampling)
    if spec.backend == "llama":
        from .backends.llama import LlamaGenerator

        path = model_file(spec)
        if not path.exists():
            raise ModelNotFoundError(
                f"model {spec.name} ({spec.repo}/{spec.file}) is not in the store at {path}; "
                f"run: tongyi-local models pull {spec.name}")
        options: dict[str, Any] = {}
        if spec.kv_cache_type != "f16":
            options["kv_cache_type"] = spec.kv_cache_type
        return LlamaGenerator(path, n_ctx=spec.context_length, n_batch=spec.batch_size,
                              n_ubatch=spec.batch_size, threads=_threads(spec.threads),
                              batch_threads=_threads(spec.batch_threads), mmap=spec.mmap,
                              mlock=spec.mlock, sampling=sampling, name=spec.name,
                              disk_prefix_cache=spec.disk_prefix_cache,
                              speculative=None if spec.speculative == "off" else spec.speculative,
                              **options)
    from .backends import remote_from_spec

    return remote_from_spec(spec, sampling)


def estimate_model(spec: ModelSpec) -> int:
    """Bytes a load needs (weights + KV cache at the configured context); remote models: 0."""
    if spec.backend != "llama":
        return 0
    from .backends._lookup import SpeculativeConfig, logits_rows
    from .backends.llama import DEFAULT_SLOTS
    from .gguf_header import estimate_memory, read_header

    path = model_file(spec)
    if not path.exists():
        raise ModelNotFoundError(f"model {spec.name} is not in the store at {path}; "
                                 f"run: tongyi-local models pull {spec.name}")
    drafts = SpeculativeConfig() if spec.speculative != "off" else None
    return estimate_memory(read_header(path), spec.context_length, spec.kv_cache_type,
                           n_outputs=logits_rows(DEFAULT_SLOTS, drafts, spec.batch_size))


def pool_key(spec: ModelSpec) -> tuple:
    """Roles share a loaded model when file and load settings agree."""
    where = (spec.source, spec.path, spec.repo, spec.file, spec.revision, spec.model_id,
             spec.base_url)
    return (spec.backend, where, spec.context_length, spec.batch_size, spec.kv_cache_type,
            spec.mmap, spec.mlock, spec.threads, spec.batch_threads, spec.disk_prefix_cache)


class RoleGenerator(BaseGenerator):
    """A role's view of its model: system prompt and sampling applied, model from the pool."""

    def __init__(self, registry: Registry, role: RoleSpec, model: ModelSpec) -> None:
        self.role, self.model, self._registry = role, model, registry
        self.name = f"{role.name}:{model.name}"
        self.default_sampling = Sampling().merged(model.sampling).merged(role.sampling)
        self.remote = model.remote
        self.guarantees_schema = model.backend == "llama"
        # telemetry: a role's span names its role and model; the model's own span is nested
        self.backend, self.role_name, self.telemetry_leaf = model.backend, role.name, False
        self.telemetry_model = model.model_id or model.name

    def _generate(self, request: Request) -> Iterator[Chunk]:
        messages = request.messages
        if (messages is not None and self.role.system_prompt
                and messages[0].role != "system"):
            request = replace(request, messages=(Message("system", self.role.system_prompt),
                                                 *messages))
        with self._registry.pool.checkout(pool_key(self.model), self.model, self.model.name,
                                          self.role.name) as generator:
            yield from generator.generate(request)


class Registry:
    """Roles from a config, models from a pool. One per process is usually enough."""

    def __init__(self, config: Config | None = None, *, pool: ModelPool | None = None,
                 profile: str | None = None, config_path: str | Path | None = None) -> None:
        self.config = config or load_config(config_path)
        self.profile = profile
        self.pool = pool or ModelPool(load_model, estimate_model)

    def for_role(self, role: str) -> Generator:
        """The role's generator; with ``fallback`` set, requests the primary cannot serve (load
        failure, connection error, timeout, overload) go to the fallback model; a
        ``privacy = "local-only"`` role never reaches a remote backend."""
        from .fallback import FallbackGenerator, enforce_privacy

        spec = self.config.role(role, self.profile)
        generator: Generator = RoleGenerator(self, spec, self.config.models[spec.model])
        if spec.fallback:
            secondary = RoleGenerator(self, spec, self.config.models[spec.fallback])
            generator = FallbackGenerator(generator, secondary, role=spec.name,
                                          privacy=spec.privacy)
        return enforce_privacy(generator, spec.privacy, spec.name)

    def roles(self) -> dict[str, ModelSpec]:
        return {name: self.config.model_for(name, self.profile) for name in self.config.roles}

    def close(self) -> None:
        self.pool.close()


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry for the models.toml layers in force now: after a change of
    working directory into another project (or of $TONGYI_LOCAL_CONFIG) it holds that project's
    roles, over the same pool of loaded models."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        elif _default.config.layers != tuple(config_layers()):
            _default = Registry(pool=_default.pool)
        return _default


def for_role(role: str, *, config_path: str | Path | None = None,
             profile: str | None = None) -> Generator:
    """A generator for ``role`` from the process-wide registry (or a one-off config/profile)."""
    registry = default_registry()
    if config_path is None and profile is None:
        return registry.for_role(role)
    config = load_config(config_path) if config_path else registry.config
    return Registry(config, pool=registry.pool, profile=profile).for_role(role)


def resolve_model(config: Config, name: str, profile: str | None = None) -> ModelSpec:
    """A model entry by role name or model name (roles first, as agents speak of roles)."""
    if name in config.roles:
        return config.model_for(name, profile)
    if name in config.models:
        return config.models[name]
    raise ConfigError(f"{name!r} is neither a role ({', '.join(sorted(config.roles))}) nor a "
                      f"model ({', '.join(sorted(config.models))})")


def pull_model(spec: ModelSpec, progress: bool = True) -> Path:
    """Bring a model's file into the store (hub download, or the packaged starter model)."""
    from . import store

    if spec.backend != "llama":
        raise ConfigError(f"model {spec.name} runs on the {spec.backend} backend: nothing to pull")
    if spec.source == "starter":
        return store.starter_model()
    if spec.source == "starter-chat":
        return store.starter_chat_model(progress=progress)
    if spec.source == "path":
        raise ConfigError(f"model {spec.name} is a local file ({spec.path}): nothing to pull")
    return store.pull(spec.repo, spec.file, revision=spec.revision, sha256=spec.sha256,
                      progress=progress)


def model_status(spec: ModelSpec) -> dict[str, Any]:
    """Where a model's file is, whether it is present and its size (no weights read)."""
    if spec.backend != "llama":
        return {"where": f"{spec.backend}:{spec.model_id}", "present": None, "size_bytes": None}
    if spec.source in ("starter", "starter-chat"):  # where it goes, without assembling it
        from . import store
        from .paths import models_dir

        path = models_dir() / (store.STARTER_FILE if spec.source == "starter"
                               else store.STARTER_CHAT_FILE)
    else:
        path = model_file(spec)
    present = path.exists()
    return {"where": str(path), "present": present,
            "size_bytes": path.stat().st_size if present else None}
