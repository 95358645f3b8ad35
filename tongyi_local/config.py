"""models.toml -> typed, validated specs.

Precedence (highest first): a file passed as an argument > ``$TONGYI_LOCAL_CONFIG`` > the user's
file (``$TONGYI_LOCAL_HOME/models.toml`` when that is set, else
``~/.config/tongyi_local/models.toml``) > the packaged ``tongyi_local/models.toml``. Layers are
merged by entry: a model, role or profile defined in a higher layer replaces the lower one whole.
Every mistake is one ``ConfigError`` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gguf.constants import LlamaFileType

from .errors import ConfigError, TongyiError
from .paths import HOME_ENV
from .types import Sampling

CONFIG_ENV = "TONGYI_LOCAL_CONFIG"
PROFILE_ENV = "TONGYI_LOCAL_PROFILE"
ROLES = ("coordinator", "researcher", "coder", "tester", "reviewer", "default")
BACKENDS = ("llama", "dashscope", "openai", "fake")
SOURCES = ("starter", "starter-chat", "hub", "path")
QUANTIZATIONS = tuple(sorted({t.name.removeprefix("MOSTLY_") for t in LlamaFileType
                              if t.name != "GUESSED"}))
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
PRIVACY = ("any", "local-only")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAMPLING_KEYS = tuple(f.name for f in fields(Sampling))


@dataclass(frozen=True)
class ModelSpec:
    """One model entry: where its file (or endpoint) is and how to load it."""

    name: str
    defined_in: str
    backend: str = "llama"
    source: str = "path"
    path: str | None = None
    repo: str | None = None
    file: str | None = None
    revision: str = "main"
    sha256: str | None = None
    quantization: str | None = None
    context_length: int = 4096
    threads: int | str = "auto"
    batch_threads: int | str = "auto"
    batch_size: int = 512
    mmap: bool = True
    mlock: bool = False
    kv_cache_type: str = "f16"
    sampling: dict[str, Any] = field(default_factory=dict)
    # remote backends (dashscope, openai) and the fake one
    model_id: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 60.0
    replies: tuple[Any, ...] = ()
    remote: bool = False  # requests leave this machine (privacy rules check it)


@dataclass(frozen=True)
class RoleSpec:
    name: str
    model: str
    defined_in: str
    system_prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None
    privacy: str = "any"


@dataclass(frozen=True)
class Config:
    models: dict[str, ModelSpec]
    roles: dict[str, RoleSpec]
    profiles: dict[str, dict[str, str]]
    files: tuple[str, ...]

    def role(self, name: str, profile: str | None = None) -> RoleSpec:
        """The role's spec, with ``profile`` (argument > $TONGYI_LOCAL_PROFILE) applied."""
        if name not in self.roles:
            raise ConfigError(f"unknown role {name!r}; roles: {', '.join(sorted(self.roles))}")
        spec = self.roles[name]
        profile = profile or os.environ.get(PROFILE_ENV) or None
        if profile:
            if profile not in self.profiles:
                raise ConfigError(f"unknown profile {profile!r}; profiles: "
                                  f"{', '.join(sorted(self.profiles)) or 'none'}")
            model = self.profiles[profile].get(name)
            if model:
                spec = RoleSpec(**{**spec.__dict__, "model": model})
        return spec

    def model_for(self, role: str, profile: str | None = None) -> ModelSpec:
        return self.models[self.role(role, profile).model]


def packaged_file() -> Path:
    return Path(__file__).with_name("models.toml")


def user_file() -> Path:
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home) / "models.toml"
    return Path.home() / ".config" / "tongyi_local" / "models.toml"


def config_files(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """Files in the order they are layered (lowest precedence first)."""
    files = [packaged_file()]
    if user_file().exists():
        files.append(user_file())
    for explicit, what in ((os.environ.get(CONFIG_ENV), f"${CONFIG_ENV}"), (path, "argument")):
        if explicit:
            p = Path(explicit).expanduser()
            if not p.is_file():
                raise ConfigError(f"config file {p} (from {what}) does not exist")
            files.append(p)
    return files


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    models: dict[str, ModelSpec] = {}
    roles: dict[str, RoleSpec] = {}
    profiles: dict[str, dict[str, str]] = {}
    files = config_files(path)
    for file in files:
        m, r, p = _parse_file(file)
        models.update(m)
        roles.update(r)
        profiles.update(p)
    for role in roles.values():
        for key, target in (("model", role.model), ("fallback", role.fallback)):
            if target is not None and target not in models:
                raise ConfigError(f"{role.defined_in}: roles.{role.name}.{key} names model "
                                  f"{target!r}, which no file defines; defined: "
                                  f"{', '.join(sorted(models))}")
    for name, mapping in profiles.items():
        for role, model in mapping.items():
            if model not in models:
                raise ConfigError(f"profiles.{name}.{role} names undefined model {model!r}; "
                                  f"defined: {', '.join(sorted(models))}")
    return Config(models=models, roles=roles, profiles=profiles,
                  files=tuple(str(f) for f in files))


def _parse_file(file: Path) -> tuple[dict, dict, dict]:
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from None
    _only(file, "", data, ("models", "roles", "profiles"))
    models = {name: _model(file, name, entry) for name, entry in _tables(file, "models", data)}
    roles = {}
    for name, entry in _tables(file, "roles", data):
        if name not in ROLES:
            raise ConfigError(f"{file}: roles.{name} is not a known role; allowed: {', '.join(ROLES)}")
        roles[name] = _role(file, name, entry)
    profiles = {}
    for name, entry in _tables(file, "profiles", data):
        for role, model in entry.items():
            if role not in ROLES or not isinstance(model, str):
                raise ConfigError(f"{file}: profiles.{name}.{role} must map a known role "
                                  f"({', '.join(ROLES)}) to a model name")
        profiles[name] = dict(entry)
    return models, roles, profiles


def _tables(file: Path, section: str, data: dict) -> list[tuple[str, dict]]:
    tables = data.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{file}: {section} must be a table of tables")
    for name, entry in tables.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{file}: {section}.{name} must be a table")
    return list(tables.items())


def _only(file: Path, where: str, entry: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{file}: unknown key {where}{unknown[0]}; allowed: {', '.join(allowed)}")


def _choice(file: Path, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{file}: {key} = {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _model(file: Path, name: str, entry: dict) -> ModelSpec:
    where = f"models.{name}."
    allowed = tuple(f.name for f in fields(ModelSpec) if f.name not in ("name", "defined_in"))
    _only(file, where, entry, allowed)
    backend = entry.get("backend", "llama")
    _choice(file, where + "backend", backend, BACKENDS)
    source = entry.get("source", "path" if backend == "llama" else "remote")
    if backend == "llama":
        _choice(file, where + "source", source, SOURCES)
        needs = {"path": ("path",), "hub": ("repo", "file")}.get(source, ())
        for key in needs:
            if not entry.get(key):
                raise ConfigError(f"{file}: {where}{key} is required when source = {source!r}")
    elif backend in ("dashscope", "openai") and not entry.get("model_id"):
        raise ConfigError(f"{file}: {where}model_id is required for backend {backend!r}")
    if backend == "openai" and not entry.get("base_url"):
        raise ConfigError(f"{file}: {where}base_url is required for backend 'openai'")
    remote = entry.get("remote", backend in ("dashscope", "openai"))
    if not isinstance(remote, bool) or (backend == "llama" and remote) or (
            backend == "dashscope" and not remote):
        raise ConfigError(f"{file}: {where}remote = {remote!r} is not allowed for backend "
                          f"{backend!r}; allowed: true for dashscope, false for llama, either for "
                          "openai (false = a trusted server on this machine) and fake")
    if "quantization" in entry:
        _choice(file, where + "quantization", entry["quantization"], QUANTIZATIONS)
    if "kv_cache_type" in entry:
        _choice(file, where + "kv_cache_type", entry["kv_cache_type"], KV_CACHE_TYPES)
    sha = entry.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise ConfigError(f"{file}: {where}sha256 = {sha!r} is malformed; allowed: 64 lowercase "
                          "hex digits")
    for key in ("threads", "batch_threads"):
        value = entry.get(key, "auto")
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{file}: {where}{key} = {value!r}; allowed: \"auto\" or an integer >= 1")
    for key in ("context_length", "batch_size"):
        if key not in entry:
            continue
        value = entry[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 16:
            raise ConfigError(f"{file}: {where}{key} = {value!r}; allowed: an integer >= 16")
    for key in ("mmap", "mlock"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{file}: {where}{key} must be true or false")
    sampling = _sampling(file, where + "sampling", entry.get("sampling", {}))
    values = {k: v for k, v in entry.items() if k != "sampling"}
    if "replies" in values:
        values["replies"] = tuple(values["replies"])
    values["remote"] = remote
    return ModelSpec(name=name, defined_in=str(file), source=source, sampling=sampling, **{
        k: v for k, v in values.items() if k != "source"})


def _role(file: Path, name: str, entry: dict) -> RoleSpec:
    where = f"roles.{name}."
    _only(file, where, entry, ("model", "system_prompt", "sampling", "fallback", "privacy"))
    if not isinstance(entry.get("model"), str):
        raise ConfigError(f"{file}: {where}model is required (the name of a [models.*] entry)")
    privacy = entry.get("privacy", "any")
    _choice(file, where + "privacy", privacy, PRIVACY)
    return RoleSpec(name=name, model=entry["model"], defined_in=str(file),
                    system_prompt=entry.get("system_prompt"),
                    sampling=_sampling(file, where + "sampling", entry.get("sampling", {})),
                    fallback=entry.get("fallback"), privacy=privacy)


def _sampling(file: Path, where: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: {where} must be a table")
    _only(file, where + ".", values, _SAMPLING_KEYS)
    try:
        Sampling().merged(values)
    except TongyiError as exc:
        raise ConfigError(f"{file}: {where}: {exc}") from None
    return dict(values)
