"""Build the llama.cpp runtime from a CMake preset: llama-cpp-python's wheel and llama.cpp's tools.

Why: upstream wheels are built without AVX-512, and pip hands back its cached wheel even when
CMAKE_ARGS changed. So the preset's cache variables become CMAKE_ARGS here, and every build is
cached under a key of (llama-cpp-python version, resolved preset contents): a re-run reuses it
in seconds, a changed preset really rebuilds. llama-bench and friends are built from the very
llama.cpp source the sdist vendors, so benchmarks compare the same kernels.

Runs before llama_cpp exists, so it imports nothing from the runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import BuildError, ConfigError
from .paths import home_dir

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PRESET_ENV = "TONGYI_LOCAL_PRESET"
BUILD_RECORD = "tongyi_local_build.json"  # written into the venv (sys.prefix)
# llama.cpp's own tools the benchmarks and the evidence pipeline run, built in one go.
DEFAULT_TOOLS = ("llama-bench", "llama-batched-bench", "llama-perplexity", "llama-imatrix")
# What every "llama-cpp-python is missing" message tells the user to do: the command ships with
# the package, so it works from a wheel as well as from a source checkout.
BUILD_HINT = ("run `tongyi-local build` (it builds llama-cpp-python from the CMake preset that "
              "fits this CPU, once per preset)")

_ZEN4_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
               "avx2", "fma", "f16c"}
_AVX2_FLAGS = {"avx2", "fma", "f16c"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    cache_variables: dict[str, str]

    @property
    def cmake_args(self) -> list[str]:
        return [f"-D{k}={v}" for k, v in sorted(self.cache_variables.items())]

    @property
    def key(self) -> str:
        """Cache key: changes whenever the runtime version or any cache variable changes."""
        blob = json.dumps({"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION,
                           "cache": self.cache_variables}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def presets_file() -> Traversable:
    """The CMake presets shipped inside the package (``tongyi_local/data``), so an installed
    wheel builds exactly as a source checkout does."""
    return files("tongyi_local") / "data" / "CMakePresets.json"


def load_presets(path: Path | Traversable | None = None) -> dict[str, Preset]:
    """Read CMakePresets.json, resolving ``inherits``; hidden presets are not offered."""
    path = path or presets_file()
    try:
        raw = json.loads(path.read_text())["configurePresets"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read CMake presets from {path}: {exc}") from exc
    by_name = {p["name"]: p for p in raw}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, str]:
        if name in seen:
            raise ConfigError(f"{path}: preset inheritance loops through {name!r}")
        entry = by_name[name]
        parents = entry.get("inherits", [])
        merged: dict[str, str] = {}
        for parent in [parents] if isinstance(parents, str) else parents:
            merged.update(resolve(parent, seen + (name,)))
        for key, value in entry.get("cacheVariables", {}).items():
            merged[key] = value["value"] if isinstance(value, dict) else str(value)
        return merged

    return {name: Preset(name, entry.get("description", ""), resolve(name))
            for name, entry in by_name.items() if not entry.get("hidden")}


def choose_preset(cpu_flags: frozenset[str] | set[str]) -> str:
    """The preset that fits a CPU: AVX-512 (Zen 4 level) if present, else AVX2, else native."""
    if _ZEN4_FLAGS <= set(cpu_flags):
        return "zen4"
    if _AVX2_FLAGS <= set(cpu_flags):
        return "avx2"
    return "native"


def select_preset(name: str | None = None, path: Path | Traversable | None = None) -> Preset:
    """Argument > $TONGYI_LOCAL_PRESET > the preset that fits this host."""
    from .hardware import read_topology

    presets = load_presets(path)
    chosen = name or os.environ.get(PRESET_ENV) or choose_preset(read_topology().flags)
    if chosen not in presets:
        raise ConfigError(f"unknown CMake preset {chosen!r} (from "
                          f"{'argument' if name else PRESET_ENV if os.environ.get(PRESET_ENV) else 'host'}); "
                          f"choose one of: {', '.join(sorted(presets))}")
    return presets[chosen]


def cache_dir() -> Path:
    return home_dir() / "build"


def build_record_path() -> Path:
    return Path(sys.prefix) / BUILD_RECORD


def installed_build() -> dict | None:
    """What `ensure_runtime` last installed into this environment, if anything."""
    try:
        return json.loads(build_record_path().read_text())
    except (OSError, ValueError):
        return None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None,
         log: Path | None = None) -> None:
    print(f"[tongyi-local build] {what}", file=sys.stderr, flush=True)
    out = open(log, "w") if log else None
    try:
        # Its own process group: if we are interrupted (Ctrl-C, a timeout), the whole build
        # tree goes with us instead of compilers left running into the build directory.
        proc = subprocess.Popen(cmd, env=env, stdout=out or None,
                                stderr=subprocess.STDOUT if out else None, start_new_session=True)
        try:
            proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        tail = ""
        if log and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise BuildError(f"{what} failed (exit {proc.returncode}){tail}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """One builder per build directory across processes; the others wait, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]


def sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded once: it feeds both the wheel and the tools."""
    target = cache_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetching-") as tmp:
        _run(_pip("download", "--no-deps", "--no-binary", ":all:",
                  "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"),
             f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist",
             log=Path(tmp) / "download.log")
        os.replace(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")), target)
    return target


def vendored_source() -> Path:
    """The llama.cpp tree inside the pinned llama-cpp-python sdist (extracted once)."""
    src_root = cache_dir() / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    llama_src = src_root / "vendor" / "llama.cpp"
    if (llama_src / "CMakeLists.txt").exists():
        return llama_src
    archive = sdist()
    src_root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_root.parent, prefix=".extracting-") as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / src_root.name, src_root)
    return llama_src


def build_wheel(preset: Preset) -> Path:
    """Return the cached wheel for this preset, building it from the sdist when absent."""
    wheel_dir = cache_dir() / "wheels" / preset.key
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir.parent, prefix=".building-") as tmp:
        env = dict(os.environ, CMAKE_ARGS=" ".join(preset.cmake_args),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        _run(_pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                  "-w", tmp, str(sdist())),
             f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with preset "
             f"{preset.name!r} (a few minutes, once per preset)",
             env=env, log=Path(tmp) / "build.log")
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError("pip reported success but produced no llama-cpp-python wheel")
        staged = Path(tmp) / "wheel"
        staged.mkdir()
        shutil.move(str(built[-1]), staged / built[-1].name)
        (staged / "preset.json").write_text(json.dumps(
            {"preset": preset.name, "cache": preset.cache_variables}, indent=2))
        os.replace(staged, wheel_dir)  # atomic: a half-built wheel never looks cached
    return sorted(wheel_dir.glob("llama_cpp_python-*.whl"))[-1]


def ensure_runtime(preset: Preset) -> dict:
    """Install llama-cpp-python built from ``preset`` into this environment (no-op if current)."""
    record = installed_build()
    if record and record.get("key") == preset.key and _llama_cpp_importable():
        return record
    wheel = build_wheel(preset)
    _run(_pip("install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)),
         f"installing {wheel.name} ({preset.name})")
    _run(_pip("install", "--quiet", "numpy>=1.26", "diskcache>=5.6.1", "jinja2>=2.11.3",
              "typing-extensions>=4.5"), "installing llama-cpp-python's dependencies")
    record = {"preset": preset.name, "key": preset.key, "version": LLAMA_CPP_PYTHON_VERSION,
              "cmake_args": preset.cmake_args, "wheel": str(wheel)}
    build_record_path().write_text(json.dumps(record, indent=2))
    return record


def _llama_cpp_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    return probe.returncode == 0


def build_tools(preset: Preset, tools: tuple[str, ...] = DEFAULT_TOOLS) -> dict[str, Path]:
    """Build llama.cpp's own tools from the vendored source with the preset's flags."""
    build_dir = cache_dir() / "tools" / preset.key
    paths = {t: build_dir / "bin" / t for t in tools}
    if all(p.exists() for p in paths.values()):
        return paths
    with _build_lock(build_dir.with_name(f".{preset.key}.lock")):
        if not all(p.exists() for p in paths.values()):  # another process may have built them
            _build_tools(preset, build_dir, tools)
    return paths


def _build_tools(preset: Preset, build_dir: Path, tools: tuple[str, ...]) -> None:
    src = vendored_source()
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n" not in cache.read_text():
        shutil.rmtree(build_dir)  # configured from another source tree: start clean
    _run(["cmake", "-S", str(src), "-B", str(build_dir), *preset.cmake_args, "-DBUILD_SHARED_LIBS=OFF",
          # examples (llama-lookup, ...) only add targets: the ones asked for are built below
          "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON",
          "-DLLAMA_BUILD_SERVER=OFF"],
         f"configuring llama.cpp tools with preset {preset.name!r}",
         log=cache_dir() / f"tools-{preset.key}-configure.log")
    _run(["cmake", "--build", str(build_dir), "--config", "Release",
          "-j", str(os.cpu_count() or 2), "--target", *tools],
         f"building {', '.join(tools)} ({preset.name})",
         log=cache_dir() / f"tools-{preset.key}-build.log")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tongyi_local.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help=f"CMake preset (default: ${PRESET_ENV} or host's fit)")
    parser.add_argument("--tools", action="store_true", help="also build llama.cpp's tools")
    args = parser.parse_args(argv)
    try:
        preset = select_preset(args.preset)
        record = ensure_runtime(preset)
        print(f"llama-cpp-python {record['version']} preset={record['preset']} key={record['key']}")
        if args.tools:
            for name, path in build_tools(preset).items():
                print(f"{name}: {path}")
    except (BuildError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
