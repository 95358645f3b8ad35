"""models.toml -> typed, validated specs, from a stack of layers.

Layers, highest precedence first: a file passed as an argument > ``$TONGYI_LOCAL_CONFIG`` > the
project's file, the nearest ``models.toml`` from the working directory upward (to the filesystem
root, as tools find ``pyproject.toml``) > the user's file (``$TONGYI_LOCAL_HOME/models.toml`` when
that is set, else ``~/.config/tongyi_local/models.toml``) > the packaged defaults
(``tongyi_local/defaults.toml``: the starter models, every role on them, profile ``starter``).
The same file found twice counts once, in its highest place.

Layers merge by entry: a model, role or profile defined in a higher layer replaces the entry of
the same name below it whole (its keys are not mixed with the lower entry's); entries no higher
layer names stay as the lower layer has them. ``Config.origins`` records the layer each entry
came from and the ones it replaced (``tongyi-local models config`` prints them).

Every mistake is one ``ConfigError`` naming the file, the key and what is allowed, raised when
the file is loaded: a value of the wrong type, a model name or hub file name that could leave the
model directory, or a control character in a path never reaches the code that uses it.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from gguf.constants import LlamaFileType

from .errors import ConfigError, TongyiError
from .kv_types import KV_CACHE_TYPES
from .paths import HOME_ENV
from .types import Sampling

CONFIG_ENV = "TONGYI_LOCAL_CONFIG"
PROJECT_FILE = "models.toml"
PROFILE_ENV = "TONGYI_LOCAL_PROFILE"
ROLES = ("coordinator", "researcher", "coder", "tester", "reviewer", "default")
BACKENDS = ("llama", "dashscope", "openai", "fake")
SOURCES = ("starter", "starter-chat", "hub", "path")
QUANTIZATIONS = tuple(sorted({t.name.removeprefix("MOSTLY_") for t in LlamaFileType
                              if t.name != "GUESSED"}))
PRIVACY = ("any", "local-only")
SPECULATIVE = ("ngram", "off")  # prompt-lookup drafting per slot, or none
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SAMPLING_KEYS = tuple(f.name for f in fields(Sampling))
# A model name may become part of a file name (store, caches): no separators, no "..".
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TEXT_KEYS = ("path", "repo", "file", "revision", "model_id", "base_url", "api_key_env")
_COUNTS = {"context_length": (16, 1 << 24), "batch_size": (16, 1 << 20)}
MAX_THREADS = 1024


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
    disk_prefix_cache: bool = True  # role prefixes' KV state kept on disk across processes
    speculative: str = "ngram"  # prompt-lookup drafting per request (LlamaGenerator); "off"
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


class LayerKind(StrEnum):
    """Why a file is in the stack, lowest precedence first."""

    PACKAGED = "packaged"
    USER = "user"
    PROJECT = "project"
    ENVIRONMENT = "environment"
    ARGUMENT = "argument"


_LAYER_WHY = {
    LayerKind.PACKAGED: "the packaged defaults",
    LayerKind.USER: "the user's file",
    LayerKind.PROJECT: "the nearest models.toml from the working directory upward",
    LayerKind.ENVIRONMENT: f"${CONFIG_ENV}",
    LayerKind.ARGUMENT: "an argument",
}

Section = Literal["models", "roles", "profiles"]
SECTIONS: tuple[Section, ...] = ("models", "roles", "profiles")


@dataclass(frozen=True)
class ConfigLayer:
    """One models.toml in the stack and why it is there."""

    kind: LayerKind
    path: Path

    @property
    def why(self) -> str:
        return _LAYER_WHY[self.kind]


@dataclass(frozen=True)
class EntryOrigin:
    """Where one merged entry comes from: the highest layer defining it, and the lower layers'
    entries of the same name it replaced (highest first)."""

    section: Section
    name: str
    layer: ConfigLayer
    replaced: tuple[ConfigLayer, ...] = ()


@dataclass(frozen=True)
class Config:
    """The merged entries of every layer, the layers and where each entry comes from."""

    models: dict[str, ModelSpec]
    roles: dict[str, RoleSpec]
    profiles: dict[str, dict[str, str]]
    layers: tuple[ConfigLayer, ...]  # lowest precedence first, as merged
    origins: tuple[EntryOrigin, ...] = ()  # by section (models, roles, profiles), then name

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(str(layer.path) for layer in self.layers)

    def origin(self, section: Section, name: str) -> EntryOrigin:
        """The layer an entry comes from (``origin("roles", "coder").layer.kind``)."""
        for origin in self.origins:
            if (origin.section, origin.name) == (section, name):
                return origin
        raise ConfigError(f"no entry {_key_path(section, name)} in any layer; layers: "
                          f"{', '.join(str(layer.path) for layer in self.layers)}")

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
    """The packaged defaults: package data beside this module, so a wheel install has them."""
    return Path(__file__).with_name("defaults.toml")


def user_file() -> Path:
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home) / "models.toml"
    return Path.home() / ".config" / "tongyi_local" / "models.toml"


def project_file(start: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest ``models.toml`` in ``start`` (default: the working directory) or a directory
    above it, up to the filesystem root; None when there is none (or no working directory)."""
    try:
        here = Path(start if start is not None else Path.cwd()).absolute()
    except OSError:  # the working directory was removed
        return None
    for directory in (here, *here.parents):
        candidate = directory / PROJECT_FILE
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a directory this process may not look into: keep going up
            continue
    return None


def config_layers(path: str | os.PathLike[str] | None = None) -> list[ConfigLayer]:
    """The files found, in the order they are merged (lowest precedence first)."""
    layers = [ConfigLayer(LayerKind.PACKAGED, packaged_file())]
    if user_file().exists():
        layers.append(ConfigLayer(LayerKind.USER, user_file()))
    project = project_file()
    if project is not None:
        layers.append(ConfigLayer(LayerKind.PROJECT, project))
    for explicit, kind in ((os.environ.get(CONFIG_ENV), LayerKind.ENVIRONMENT),
                           (path, LayerKind.ARGUMENT)):
        if explicit:
            p = Path(explicit).expanduser()
            if not p.is_file():  # False, not an error, for a NUL byte or a name too long
                shown = str(p) if str(p).isprintable() else repr(str(p))
                raise ConfigError(f"config file {shown} (from {_LAYER_WHY[kind]}) does not exist")
            layers.append(ConfigLayer(kind, p))
    return _each_file_once(layers)


def _each_file_once(layers: list[ConfigLayer]) -> list[ConfigLayer]:
    """A file reached twice (the project's file also named by $TONGYI_LOCAL_CONFIG) is one
    layer, in its highest place."""
    seen: set[Path] = set()
    kept: list[ConfigLayer] = []
    for layer in reversed(layers):
        key = layer.path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(layer)
    return kept[::-1]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The merged config of every layer found (``path``: the argument layer, if any)."""
    layers = config_layers(path)
    merged: dict[Section, dict[str, Any]] = {section: {} for section in SECTIONS}
    defined_by: dict[tuple[Section, str], list[ConfigLayer]] = {}
    for layer in layers:
        for section, entries in zip(SECTIONS, _parse_file(layer.path)):
            merged[section].update(entries)
            for name in entries:
                defined_by.setdefault((section, name), []).append(layer)
    models, roles, profiles = merged["models"], merged["roles"], merged["profiles"]
    defined = ", ".join(sorted(models))
    for role in roles.values():
        for key, target in (("model", role.model), ("fallback", role.fallback)):
            if target is not None and target not in models:
                raise ConfigError(f"{role.defined_in}: {_key_path('roles', role.name, key)} names "
                                  f"model {target!r}, which no file defines; defined: {defined}")
    for name, mapping in profiles.items():
        for role, model in mapping.items():
            if model not in models:
                raise ConfigError(f"{defined_by['profiles', name][-1].path}: "
                                  f"{_key_path('profiles', name, role)} names undefined model "
                                  f"{model!r}; defined: {defined}")
    origins = tuple(EntryOrigin(section, name, found[-1], tuple(reversed(found[:-1])))
                    for (section, name), found in sorted(
                        defined_by.items(), key=lambda item: (SECTIONS.index(item[0][0]),
                                                              item[0][1])))
    return Config(models=models, roles=roles, profiles=profiles, layers=tuple(layers),
                  origins=origins)


def _key_path(*parts: str) -> str:
    """A dotted key as TOML writes it: names that are not bare keys are quoted, with every
    unprintable character escaped, so a message shows exactly which entry is meant and never
    sends a control sequence to the terminal."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else _quoted(p) for p in parts)


def _quoted(text: str) -> str:
    def escape(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        if c.isprintable():
            return c
        return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"

    return '"' + "".join(map(escape, text)) + '"'


def _shown(value: Any) -> str:
    """A value for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_file(file: Path) -> tuple[dict, dict, dict]:
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from exc
    _only(file, "", data, ("models", "roles", "profiles"))
    models = {name: _model(file, name, entry) for name, entry in _tables(file, "models", data)}
    roles = {}
    for name, entry in _tables(file, "roles", data):
        if name not in ROLES:
            raise ConfigError(f"{file}: {_key_path('roles', name)} is not a known role; allowed: "
                              f"{', '.join(ROLES)}")
        roles[name] = _role(file, name, entry)
    profiles = {}
    for name, entry in _tables(file, "profiles", data):
        for role, model in entry.items():
            if role not in ROLES or not isinstance(model, str):
                raise ConfigError(f"{file}: {_key_path('profiles', name, role)} must map a known "
                                  f"role ({', '.join(ROLES)}) to a model name")
        profiles[name] = dict(entry)
    return models, roles, profiles


def _tables(file: Path, section: str, data: dict) -> list[tuple[str, dict]]:
    tables = data.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{file}: {section} must be a table of tables")
    for name, entry in tables.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{file}: {_key_path(section, name)} must be a table")
    return list(tables.items())


def _only(file: Path, where: str, entry: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise ConfigError(f"{file}: unknown key {where}{_key_path(unknown[0])}; allowed: "
                          f"{', '.join(allowed)}")


def _choice(file: Path, key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{file}: {key} = {_shown(value)} is not allowed; allowed: "
                          f"{', '.join(allowed)}")


def _text(file: Path, key: str, value: Any) -> str:
    """A non-empty, printable string: a NUL byte in a path would otherwise surface far away as
    "not in the store", and a newline or a bidi control would disguise what is shown."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{file}: {key} = {_shown(value)} must be a non-empty string")
    if not value.isprintable():
        raise ConfigError(f"{file}: {key} = {_shown(value)} contains a control character or "
                          "another unprintable one (a NUL byte, a newline, ...); remove it")
    return value


def _integer(file: Path, key: str, value: Any, low: int, high: int, extra: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{file}: {key} = {_shown(value)}; allowed: {extra}an integer from "
                          f"{low} to {high}")


def _check_model_name(file: Path, name: str) -> None:
    if not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{file}: {_key_path('models', name)}: the model name {name!r} is not "
                          "allowed; use 1 to 128 letters, digits, '.', '_', '-' or '+', starting "
                          "with a letter or digit, without '..' (names can become file names)")


def _check_hub(file: Path, where: str, entry: dict) -> None:
    """repo, file and revision name a place inside the model directory (the store's own rule,
    applied key by key so the message names the key at fault)."""
    from .store import hub_file_path

    repo, name, revision = entry["repo"], entry["file"], entry.get("revision", "main")
    for key, args in (("repo", (repo, "model.gguf")), ("file", (repo, name)),
                      ("revision", (repo, name, revision))):
        try:
            hub_file_path(*args)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {where}{key}: {exc}") from exc


def _model(file: Path, name: str, entry: dict) -> ModelSpec:
    where = _key_path("models", name) + "."
    _check_model_name(file, name)
    allowed = tuple(f.name for f in fields(ModelSpec) if f.name not in ("name", "defined_in"))
    _only(file, where, entry, allowed)
    backend = entry.get("backend", "llama")
    _choice(file, where + "backend", backend, BACKENDS)
    for key in _TEXT_KEYS:
        if key in entry:
            _text(file, where + key, entry[key])
    source = entry.get("source", "path" if backend == "llama" else "remote")
    if backend == "llama":
        _choice(file, where + "source", source, SOURCES)
        needs = {"path": ("path",), "hub": ("repo", "file")}.get(source, ())
        for key in needs:
            if not entry.get(key):
                raise ConfigError(f"{file}: {where}{key} is required when source = {source!r}")
        if source == "hub":
            _check_hub(file, where, entry)
    else:
        _check_remote_fields(file, where, backend, entry)
    remote = entry.get("remote", backend in ("dashscope", "openai"))
    if not isinstance(remote, bool) or (backend == "llama" and remote) or (
            backend == "dashscope" and not remote):
        raise ConfigError(f"{file}: {where}remote = {_shown(remote)} is not allowed for backend "
                          f"{backend!r}; allowed: true for dashscope, false for llama, either for "
                          "openai (false = a trusted server on this machine) and fake")
    _check_load_settings(file, where, entry)
    sampling = _sampling(file, where + "sampling", entry.get("sampling", {}))
    values = {k: v for k, v in entry.items() if k != "sampling"}
    if "replies" in values:
        values["replies"] = _replies(file, where + "replies", values["replies"])
    values["remote"] = remote
    return ModelSpec(name=name, defined_in=str(file), source=source, sampling=sampling, **{
        k: v for k, v in values.items() if k != "source"})


def _check_remote_fields(file: Path, where: str, backend: str, entry: dict) -> None:
    if backend in ("dashscope", "openai") and not entry.get("model_id"):
        raise ConfigError(f"{file}: {where}model_id is required for backend {backend!r}")
    if backend == "openai" and not entry.get("base_url"):
        raise ConfigError(f"{file}: {where}base_url is required for backend 'openai'")
    url = entry.get("base_url")
    if url is not None and not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"{file}: {where}base_url = {_shown(url)}; allowed: an http:// or "
                          "https:// URL such as http://localhost:8000/v1")
    env = entry.get("api_key_env")
    if env is not None and not _ENV_NAME.fullmatch(env):
        raise ConfigError(f"{file}: {where}api_key_env = {_shown(env)}; allowed: the name of an "
                          "environment variable (letters, digits, '_')")
    timeout = entry.get("timeout_s", 60.0)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not math.isfinite(timeout) or timeout <= 0):
        raise ConfigError(f"{file}: {where}timeout_s = {_shown(timeout)}; allowed: a number of "
                          "seconds > 0")


def _check_load_settings(file: Path, where: str, entry: dict) -> None:
    """Quantization, KV cache type, checksum, threads, sizes and flags of a local model."""
    if "quantization" in entry:
        _choice(file, where + "quantization", entry["quantization"], QUANTIZATIONS)
    if "kv_cache_type" in entry:
        _choice(file, where + "kv_cache_type", entry["kv_cache_type"], KV_CACHE_TYPES)
    if "speculative" in entry:
        _choice(file, where + "speculative", entry["speculative"], SPECULATIVE)
    sha = entry.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise ConfigError(f"{file}: {where}sha256 = {_shown(sha)} is malformed; allowed: 64 "
                          "lowercase hex digits")
    for key in ("threads", "batch_threads"):
        value = entry.get(key, "auto")
        if value != "auto":
            _integer(file, where + key, value, 1, MAX_THREADS, extra='"auto" or ')
    for key, (low, high) in _COUNTS.items():
        if key in entry:
            _integer(file, where + key, entry[key], low, high)
    for key in ("mmap", "mlock", "disk_prefix_cache"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{file}: {where}{key} must be true or false")


def _replies(file: Path, key: str, replies: Any) -> tuple[Any, ...]:
    """A fake model's script: a list of texts or tables, checked as the fake backend will."""
    from .backends.fake import FakeReply

    if not isinstance(replies, list):
        raise ConfigError(f"{file}: {key} = {_shown(replies)}; allowed: a list of texts or "
                          "tables")
    for reply in replies:
        if not isinstance(reply, (str, dict)):
            raise ConfigError(f"{file}: {key} contains {_shown(reply)}; allowed: texts or tables")
        try:
            FakeReply.coerce(reply)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {key}: {exc}") from exc
    return tuple(replies)


def _role(file: Path, name: str, entry: dict) -> RoleSpec:
    where = _key_path("roles", name) + "."
    _only(file, where, entry, ("model", "system_prompt", "sampling", "fallback", "privacy"))
    if not isinstance(entry.get("model"), str):
        raise ConfigError(f"{file}: {where}model is required (the name of a [models.*] entry)")
    for key in ("system_prompt", "fallback"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigError(f"{file}: {where}{key} = {_shown(entry[key])} must be a string")
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
    # types Sampling's own checks would trip over (tuple(5)) or not check at all
    for key, types, allowed in (("stop", (str, list), "a string or a list of strings"),
                                ("ignore_eos", (bool,), "true or false")):
        if key in values and not isinstance(values[key], types):
            raise ConfigError(f"{file}: {where}.{key} = {_shown(values[key])}; allowed: {allowed}")
    try:
        Sampling().merged(values)
    except TongyiError as exc:
        raise ConfigError(f"{file}: {where}: {exc}") from exc
    return dict(values)
