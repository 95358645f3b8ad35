"""`tongyi-local`: parse, call the library, print. ``main`` is the one place that turns a
``TongyiError`` into a one-line message and exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import hardware
from .errors import ModelNotFoundError, TongyiError
from .types import Message

app = typer.Typer(help="Run Qwen/Tongyi GGUF models in-process through llama.cpp.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Model files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
cache_app = typer.Typer(help="Role prefixes' KV state kept on disk across processes.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = Annotated[Optional[Path], typer.Option("--model", "-m", help="GGUF file (default: the starter model; with --chat, the packaged chat model).")]
# Sampling options default to None, "not set": the model's or role's defaults from models.toml apply.
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="Most tokens to generate [default: the model's, 256].")]
TempOpt = Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 is greedy [default: the role's or model's].")]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="[default: the role's or model's]")]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="0 disables [default: the role's or model's].")]
MinPOpt = Annotated[Optional[float], typer.Option("--min-p", help="[default: the role's or model's]")]
RepeatOpt = Annotated[Optional[float], typer.Option("--repeat-penalty", help="1 disables [default: the role's or model's].")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="Generation threads (default: physical cores).")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Context length in tokens.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt (chat).")]
RoleOpt = Annotated[Optional[str], typer.Option("--role", "-r", help="Agent role from models.toml (instead of --model).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="models.toml to layer on top of the others.")]
ProfileOpt = Annotated[Optional[str], typer.Option("--profile", help="Profile from models.toml (e.g. shared).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="llama (in-process), dashscope or openai (any OpenAI-compatible server).")]
BaseUrlOpt = Annotated[Optional[str], typer.Option("--base-url", help="Endpoint of a remote backend (openai: including /v1).")]
RemoteModelOpt = Annotated[Optional[str], typer.Option("--remote-model", help="Model name on the remote backend, e.g. qwen-plus.")]
KeyEnvOpt = Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding the API key (default: DASHSCOPE_API_KEY for dashscope).")]


def _remote(backend: str, base_url: str | None, remote_model: str | None, key_env: str | None):
    if backend == "openai" and not (base_url and remote_model):
        raise typer.BadParameter("--backend openai needs --base-url and --remote-model")
    from .backends import remote_generator

    return remote_generator(backend, remote_model, base_url=base_url, api_key_env=key_env)


def _load(model: Path | None, threads: int | None, n_ctx: int, role: str | None = None,
          config: Path | None = None, profile: str | None = None, backend: str = "llama",
          base_url: str | None = None, remote_model: str | None = None,
          key_env: str | None = None, chat: bool = False):
    if backend != "llama":
        return _remote(backend, base_url, remote_model, key_env)
    if role:
        if model:
            raise typer.BadParameter("give --role or --model, not both")
        from .registry import Registry

        return Registry(config_path=config, profile=profile).for_role(role)
    from . import load, starter_chat_model_path

    if model is None and chat:  # the packaged chat model, with its sampling from models.toml
        from .config import load_config
        from .types import Sampling

        spec = load_config(config).models["starter-chat"]
        return load(starter_chat_model_path(), threads=threads, n_ctx=n_ctx,
                    sampling=Sampling().merged(spec.sampling), name=spec.name)
    return load(model, threads=threads, n_ctx=n_ctx)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text; '-' reads it from stdin.")],
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result with timings as JSON.")] = False,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the chat template.")] = False,
    system: SystemOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings to stderr.")] = False,
    max_tokens: MaxTokensOpt = None, temperature: TempOpt = None, top_p: TopPOpt = None,
    top_k: TopKOpt = None, min_p: MinPOpt = None, repeat_penalty: RepeatOpt = None,
    stop: StopOpt = None, seed: SeedOpt = None, threads: ThreadsOpt = None, ctx: CtxOpt = 4096,
    role: RoleOpt = None, config: ConfigOpt = None, profile: ProfileOpt = None,
    backend: BackendOpt = "llama", base_url: BaseUrlOpt = None, remote_model: RemoteModelOpt = None,
    api_key_env: KeyEnvOpt = None,
) -> None:
    """Generate a completion, streaming it to the terminal."""
    text = sys.stdin.read() if prompt == "-" else prompt
    options = _given(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     min_p=min_p, repeat_penalty=repeat_penalty, stop=tuple(stop or ()) or None,
                     seed=seed)
    request: str | list[Message] = text
    if chat or system:
        request = ([Message("system", system)] if system else []) + [Message("user", text)]
    with _load(model, threads, ctx, role, config, profile, backend, base_url, remote_model,
               api_key_env, chat=request is not text) as gen:
        completion = None
        for chunk in gen.stream(request, **options):
            if not as_json:
                out.print(chunk.text, end="", markup=False)
            completion = chunk.completion or completion
    if as_json:
        out.print_json(json.dumps(completion.to_dict()))
        return
    out.print()
    if verbose:
        _print_timings(completion)


def _given(**options: object) -> dict[str, object]:
    """The options the user gave; the rest stay "not set" so the model's defaults apply."""
    return {name: value for name, value in options.items() if value is not None}


def _print_timings(completion) -> None:
    t, u = completion.timings, completion.usage
    err.print(f"[dim]load {t.load_ms:.0f} ms | prompt {u.prompt_tokens} tok "
              f"{t.prompt_tokens_per_s:.1f} t/s | ttft {t.ttft_ms:.0f} ms | decode "
              f"{u.completion_tokens} tok {t.decode_tokens_per_s:.1f} t/s | total "
              f"{t.total_ms:.0f} ms | finish {completion.finish_reason}[/dim]")


@app.command()
def chat(
    model: ModelOpt = None, system: SystemOpt = None, max_tokens: MaxTokensOpt = None,
    temperature: TempOpt = None, top_p: TopPOpt = None, top_k: TopKOpt = None,
    repeat_penalty: RepeatOpt = None, seed: SeedOpt = None, threads: ThreadsOpt = None,
    ctx: CtxOpt = 4096,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print timings after each reply.")] = False,
) -> None:
    """Interactive chat that keeps the conversation. /reset clears it, /exit or Ctrl-D leaves."""
    options = _given(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     repeat_penalty=repeat_penalty, seed=seed)
    start = [Message("system", system)] if system else []
    history = list(start)
    with _load(model, threads, ctx, chat=True) as gen:
        err.print(f"[dim]{gen.name} ready. /reset clears the conversation, /exit leaves.[/dim]")
        while True:
            try:
                line = input("> ")
            except EOFError:
                out.print()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if line.strip() == "/reset":
                history = list(start)
                continue
            if not line.strip():
                continue
            history.append(Message("user", line))
            completion = None
            for chunk in gen.stream(history, **options):
                out.print(chunk.text, end="", markup=False)
                completion = chunk.completion or completion
            out.print()
            history.append(Message("assistant", completion.text))
            if verbose:
                _print_timings(completion)


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Report CPU, memory, the llama.cpp build, and whether the build uses the CPU's SIMD features."""
    from . import build
    from .backends.runtime import system_info

    topo = hardware.read_topology()
    plan = hardware.this_machine_plan()
    mem = hardware.memory()
    record = build.installed_build() or {}
    info = system_info()
    features = hardware.parse_system_info(info)
    missing = hardware.missing_build_features(topo.flags, features)
    report = {
        "cpu": topo.model_name, "physical_cores": topo.physical_cores,
        "logical_cpus": topo.logical_cpus, "numa_nodes": list(topo.numa_nodes),
        "simd": list(topo.simd), "memory_total_gib": round(mem.total_bytes / 2**30, 1),
        "memory_available_gib": round(mem.available_bytes / 2**30, 1),
        "threads": plan.threads, "batch_threads": plan.batch_threads,
        "pinned_cpus": list(plan.pin_cpus) if plan.pin_cpus else None,
        "preset": record.get("preset", "unknown (not built by tongyi-local)"),
        "preset_for_this_cpu": build.choose_preset(topo.flags),
        "llama_cpp_python": record.get("version"), "system_info": info.strip(),
        "missing_simd": missing,
    }
    if as_json:
        out.print_json(json.dumps(report))
    else:
        table = Table(show_header=False, box=None)
        for key, value in {**report, "numa_nodes": topo.numa_summary}.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            table.add_row(f"[bold]{key}[/bold]", shown or "-")
        out.print(table)
        for note in plan.notes:
            out.print(f"note: {note}")
    if missing:
        err.print(f"error: this CPU has {', '.join(missing)} but the llama.cpp build does not use "
                  f"it; rebuild with: tongyi-local build --preset "
                  f"{build.choose_preset(topo.flags)}")
        raise typer.Exit(1)


@app.command("build")
def build_cmd(
    preset: Annotated[Optional[str], typer.Option(help="CMake preset (zen4, avx2, native, cuda); default: $TONGYI_LOCAL_PRESET or the host's fit.")] = None,
    tools: Annotated[bool, typer.Option("--tools", help="Also build llama.cpp's tools (llama-bench, llama-batched-bench, llama-perplexity, llama-imatrix).")] = False,
) -> None:
    """Build llama-cpp-python (and llama.cpp's tools) from a CMake preset; cached per preset."""
    from . import build

    chosen = build.select_preset(preset)
    record = build.ensure_runtime(chosen)
    out.print(f"llama-cpp-python {record['version']} preset={record['preset']} key={record['key']}")
    if tools:
        for name, path in build.build_tools(chosen).items():
            out.print(f"{name}: {path}")


@models_app.command("starter")
def models_starter() -> None:
    """Assemble the packaged models (once: the starter and the chat model) and print their paths."""
    from .store import starter_chat_model, starter_model

    out.print(str(starter_model()), markup=False)
    out.print(str(starter_chat_model()), markup=False)


def _registry(config: Path | None, profile: str | None):
    from .registry import Registry

    return Registry(config_path=config, profile=profile)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@models_app.command("list")
def models_list(config: ConfigOpt = None, profile: ProfileOpt = None, as_json: JsonOpt = False) -> None:
    """Each role, its model, whether the file is present and its size."""
    from .registry import model_status

    reg = _registry(config, profile)
    rows = []
    for role, spec in sorted(reg.roles().items()):
        rows.append({"role": role, "model": spec.name, "backend": spec.backend,
                     "quantization": spec.quantization, **model_status(spec)})
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table("role", "model", "quant", "present", "size", "where")
    for r in rows:
        present = {True: "yes", False: "no", None: "remote"}[r["present"]]
        table.add_row(r["role"], r["model"], r["quantization"] or "-", present,
                      _size(r["size_bytes"]), r["where"])
    out.print(table)


@models_app.command("config")
def models_config(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The models.toml layers found (highest precedence first) and the layer each model, role
    and profile comes from."""
    from dataclasses import asdict

    from .config import load_config

    cfg = load_config(config)
    layers = cfg.layers[::-1]
    if as_json:
        out.print_json(json.dumps({"layers": [asdict(layer) | {"why": layer.why} for layer in layers],
                                   "entries": [asdict(o) for o in cfg.origins]}, default=str))
        return
    table = Table(title="models.toml layers, highest precedence first", title_justify="left")
    for column in ("layer", "file", "why"):
        table.add_column(column, overflow="fold")
    for layer in layers:
        table.add_row(layer.kind, str(layer.path), layer.why)
    out.print(table)
    entries = Table("entry", "from layer", "replaces")
    for o in cfg.origins:
        entries.add_row(f"{o.section}.{o.name}", o.layer.kind,
                        ", ".join(r.kind for r in o.replaced) or "-")
    out.print(entries)


@models_app.command("info")
def models_info(name: Annotated[str, typer.Argument(help="Role, model name, or a GGUF path.")],
                config: ConfigOpt = None, profile: ProfileOpt = None,
                ctx: Annotated[Optional[int], typer.Option("--ctx", help="Context for the RAM estimate (default: the model's).")] = None,
                as_json: JsonOpt = False) -> None:
    """What a GGUF file holds (read from its header, no weights loaded) and the RAM a load needs."""
    from .gguf_header import describe, memory_breakdown
    from .registry import model_file, resolve_model

    kv_type = "f16"
    if Path(name).expanduser().is_file():
        path, n_ctx = Path(name).expanduser(), ctx or 4096
    else:
        spec = resolve_model(_registry(config, profile).config, name, profile)
        path, n_ctx, kv_type = model_file(spec), ctx or spec.context_length, spec.kv_cache_type
        if not path.exists():
            raise ModelNotFoundError(f"model {spec.name} is not in the store at {path}; run: "
                                     f"tongyi-local models pull {name}")
    info = describe(path)
    mem = memory_breakdown(path, n_ctx, kv_type)
    info.update({"estimate_n_ctx": n_ctx, "estimate_kv_type": kv_type,
                 "estimate_weights_bytes": mem.weights, "estimate_kv_cache_bytes": mem.kv_cache,
                 "estimate_compute_bytes": mem.compute, "estimate_total_bytes": mem.total})
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    table = Table(show_header=False, box=None)
    for key, value in info.items():
        shown = _size(value) if key.endswith("_bytes") and isinstance(value, int) else str(value)
        table.add_row(f"[bold]{key}[/bold]", shown)
    out.print(table)


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="Role or model name.")],
                config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Download a model from the hub (pinned revision, sha256-checked) into the store."""
    from .registry import pull_model, resolve_model

    spec = resolve_model(_registry(config, profile).config, name, profile)
    out.print(str(pull_model(spec)), markup=False)


@models_app.command("verify")
def models_verify(name: Annotated[str, typer.Argument(help="Role or model name.")],
                  config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Re-hash a model's file against its sha256 (from models.toml, else its pull record)."""
    from . import store
    from .registry import model_file, resolve_model

    spec = resolve_model(_registry(config, profile).config, name, profile)
    path = model_file(spec)
    expected = spec.sha256 or next((f.sha256 for f in store.list_store() if f.path == path), None)
    if not expected:
        raise typer.BadParameter(f"{spec.name} has no sha256 in models.toml nor a pull record")
    store.verify(path, expected)
    out.print(f"{path}: sha256 ok")


@models_app.command("rm")
def models_rm(name: Annotated[str, typer.Argument(help="Model name, or a file name in the store.")],
              config: ConfigOpt = None, profile: ProfileOpt = None) -> None:
    """Delete a model's file (and its records) from the store."""
    from . import store

    cfg = _registry(config, profile).config
    target = cfg.models[name].file if name in cfg.models and cfg.models[name].file else name
    out.print(f"removed {store.remove(target)}")


CacheDirOpt = Annotated[Optional[Path], typer.Option("--dir", help="Cache directory [default: $TONGYI_LOCAL_KV_CACHE_DIR, else <home>/kv].")]


@cache_app.command("ls")
def cache_ls(directory: CacheDirOpt = None, as_json: JsonOpt = False) -> None:
    """Each saved role prefix: key, model file, tokens, size, last use."""
    import datetime

    from .backends import prefix_store

    found = prefix_store.entries(directory)
    if as_json:
        out.print_json(json.dumps([{"key": e.key, "model": e.model, "tokens": e.tokens,
                                    "size_bytes": e.size_bytes, "last_used": e.last_used}
                                   for e in found]))
        return
    table = Table("key", "model", "tokens", "size", "last used")
    for e in found:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(e.key[:16], e.model, str(e.tokens), _size(e.size_bytes), used)
    out.print(table)
    out.print(f"{len(found)} file(s), {_size(sum(e.size_bytes for e in found))} in "
              f"{directory or prefix_store.cache_dir()}")


@cache_app.command("clear")
def cache_clear(directory: CacheDirOpt = None) -> None:
    """Remove every saved role prefix (the next request of each role evaluates it again)."""
    from .backends import prefix_store

    count, size = prefix_store.clear(directory)
    out.print(f"removed {count} file(s), {_size(size)}")


@app.command()
def ps(as_json: JsonOpt = False) -> None:
    """Models loaded by tongyi_local processes on this machine: memory, roles and live figures
    (requests in flight and queued, slots busy, decode tokens/s over the last minute)."""
    from .pool import processes_status

    procs = processes_status()
    if as_json:
        out.print_json(json.dumps(procs))
        return
    table = Table("pid", "model", "memory", "roles", "in flight", "queued", "slots busy",
                  "decode t/s (1 min)")
    for proc in procs:
        for m in proc["models"]:
            slots = (f"{m['slots_busy']}/{m['slots']}" if m.get("slots") is not None else "-")
            rate = m.get("decode_tps")
            table.add_row(str(proc["pid"]), m["name"], _size(m["memory_bytes"]),
                          ", ".join(m["roles"]) or "-", _figure(m.get("in_flight")),
                          _figure(m.get("queued")), slots,
                          f"{rate:.1f}" if rate is not None else "-")
    out.print(table)


def _figure(value: int | None) -> str:
    return "-" if value is None else str(value)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on (default: loopback only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    config: ConfigOpt = None, profile: ProfileOpt = None,
    key_env: Annotated[Optional[str], typer.Option("--api-key-env", help="Environment variable holding a bearer key clients must send [default: TONGYI_LOCAL_API_KEY if set].")] = None,
) -> None:
    """Serve the OpenAI API (chat, completions, models) over HTTP; `model` is a role or model."""
    from .openai_api import OpenAIApp
    from .openai_api.asgi import is_loopback, serve as run_server, server_key

    api_key = server_key(key_env)
    scope = "loopback only" if is_loopback(host) else "reachable from other machines"
    out.print(f"serving the OpenAI API on http://{host}:{port}/v1 ({scope}; "
              f"{'bearer key required' if api_key else 'no key'}); Ctrl-C stops")
    if not is_loopback(host) and not api_key:
        err.print("warning: listening beyond loopback without a key: anyone who reaches this "
                  "port can use the models; set --api-key-env")
    run_server(OpenAIApp(config, profile), host=host, port=port, api_key=api_key)


from .cli_evidence import register as _register_evidence  # noqa: E402 - commands live there

_register_evidence(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: the one place library errors become `error: ...` and exit 1."""
    try:
        app(args=argv)
    except TongyiError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
