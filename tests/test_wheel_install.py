"""The package as a user gets it: sdist -> wheel, installed into a fresh venv outside the checkout.

Why: a source checkout hides whatever the package reads from beside itself (the CMake presets
once lived above it) and every dependency the checkout's venv happens to have. Here the wheel is
built from the sdist (so both carry the package data), installed with its declared dependencies
from the index into a venv of its own, and driven only through its console script, from a
directory outside the checkout, with a model store of its own. The llama-cpp-python wheel this
machine already built is placed in that store's build cache, as a second environment on the same
machine would find it, so `tongyi-local build` is a cache hit instead of a 10-minute compile.

The dependencies come from a wheelhouse: ``pip wheel`` of the declared dependencies (the
package's, llama-cpp-python's and the build's), made once per dependency list under the store's
cache and then installed with ``--no-index``, so the venvs hold exactly what is declared and a
re-run costs no network and no resolver round trips. The venvs are made without pip (ensurepip
is seconds each) and filled by this interpreter's pip through ``--python``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from tongyi_local import build
from tongyi_local.paths import home_dir, models_dir
from tongyi_local.store import STARTER_CHAT_FILE, STARTER_FILE

CHECKOUT = Path(__file__).resolve().parent.parent
# What the installed package reads at run time: it must be inside both distributions.
PACKAGE_DATA = ("tongyi_local/data/CMakePresets.json", "tongyi_local/defaults.toml",
                "tongyi_local/evidence/corpus/corpus.txt")
BUILD_FRONTEND = "build>=1,<2"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def sh(*cmd: str | Path, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def llama_cpp_wheel() -> Path:
    """This machine's cached llama-cpp-python wheel (built by `tongyi-local build`)."""
    record = build.installed_build()
    assert record, "this environment's llama-cpp-python was not built by `tongyi-local build`"
    cached = build.cache_dir() / "wheels" / record["key"]
    wheels = sorted(cached.glob("llama_cpp_python-*.whl"))
    assert wheels, f"no cached wheel in {cached}"
    return wheels[-1]


def unconditional_requirements(wheel: Path) -> list[str]:
    """A wheel's Requires-Dist entries that hold without extras or markers."""
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        lines = zf.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines
            if line.startswith("Requires-Dist:") and ";" not in line]


def declared_requirements() -> list[str]:
    """Everything the two venvs may install: the package's dependencies and build requirements
    (pyproject.toml), the build frontend, llama-cpp-python's own dependencies (which
    `tongyi-local build` installs beside its wheel) and pip for the user's venv."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    return sorted({*project["project"]["dependencies"], *project["build-system"]["requires"],
                   BUILD_FRONTEND, "pip", *unconditional_requirements(llama_cpp_wheel())})



def wheelhouse() -> Path:
    """Wheels of every declared requirement and their dependencies, made once per requirement
    list and interpreter under the store's cache (made in a temporary folder and renamed into
    place, so a half-made wheelhouse is never used)."""
    requirements = declared_requirements()
    tag = f"{sys.implementation.cache_tag}-{platform.machine()}"
    key = hashlib.sha256("\n".join([tag, *requirements]).encode()).hexdigest()[:16]
    house = home_dir() / "test-wheelhouse" / key
    if house.is_dir():
        return house
    house.parent.mkdir(parents=True, exist_ok=True)
    staging = house.parent / f".{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
       "--wheel-dir", staging, *requirements)
    try:
        os.replace(staging, house)
    except OSError:  # another run placed it first
        shutil.rmtree(staging, ignore_errors=True)
    return house


def venv(path: Path, house: Path, *requirements: str | Path) -> Path:
    """A fresh venv from the base interpreter holding ``requirements`` and their dependencies,
    all from the wheelhouse; its python."""
    sh(sys.executable, "-m", "venv", "--without-pip", path)
    python = path / "bin" / "python"
    uv = Path(sys.executable).with_name("uv")  # ./bootstrap.sh installs it; seconds, not minutes
    if uv.is_file():
        sh(uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", python,
           "--no-index", "--find-links", house, *requirements)
    else:
        sh(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
           "--disable-pip-version-check", "--no-index", "--find-links", house, *requirements)
    return python


@pytest.fixture(scope="module")
def house() -> Path:
    return wheelhouse()


@pytest.fixture(scope="module")
def dists(tmp_path_factory, house) -> tuple[Path, Path]:
    """(sdist, wheel built from that sdist), from a copy of the checkout's files."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(CHECKOUT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
        ".hypothesis"))
    # The build requirements from pyproject.toml, installed once instead of in two isolated envs.
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())
    builder = venv(tmp / "builder", house, BUILD_FRONTEND, *project["build-system"]["requires"])
    sh(builder, "-m", "build", "--no-isolation", "--outdir", tmp / "out", src)
    (sdist,) = (tmp / "out").glob("tongyi_local-*.tar.gz")
    (wheel,) = (tmp / "out").glob("tongyi_local-*.whl")
    return sdist, wheel


def test_both_distributions_carry_the_package_data(dists):
    sdist, wheel = dists
    with tarfile.open(sdist) as tar:
        in_sdist = {name.partition("/")[2] for name in tar.getnames()}
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    for name in PACKAGE_DATA:
        assert name in in_sdist, f"{name} missing from {sdist.name}"
        assert name in in_wheel, f"{name} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in in_wheel)


@pytest.fixture(scope="module")
def installed(dists, house, tmp_path_factory):
    """A venv holding the wheel, its declared dependencies and pip, and a store whose build cache
    has this machine's llama-cpp-python wheel; returns (env, cwd, venv bin, this machine's
    build). pip in the venv reads the wheelhouse only, as `tongyi-local build` runs it."""
    record = build.installed_build()
    cached = llama_cpp_wheel().parent
    tmp = tmp_path_factory.mktemp("user")
    home, cwd = tmp / "home", tmp / "project"
    cwd.mkdir()
    # Copies, not links: nothing the installed package does can touch this machine's cache.
    shutil.copytree(cached, home / "build" / "wheels" / record["key"])
    # The models as `pip install 'tongyi-local[starter]'` and `tongyi-local models starter` leave
    # them (the store's own tests cover assembling and fetching them); the extra itself is left
    # out, since it would download its 250 MB of parts on every run.
    (home / "models").mkdir()
    for name in (STARTER_FILE, STARTER_CHAT_FILE):
        for file in (name, name + ".sha256"):
            shutil.copy2(models_dir() / file, home / "models" / file)

    python = venv(tmp / "venv", house, dists[1], "pip")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TONGYI_LOCAL_HOME=str(home), TONGYI_LOCAL_PRESET=record["preset"], COLUMNS="100",
               PATH=f"{python.parent}{os.pathsep}{env['PATH']}", PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(house))
    listed = sh(python, "-m", "pip", "list", "--format=json", env=env, cwd=cwd)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "tongyi-local" in names and not names & {"pytest", "llama-cpp-python"}
    where = sh(python, "-c", "import tongyi_local; print(tongyi_local.__file__)", env=env, cwd=cwd)
    assert Path(where.stdout.strip()).is_relative_to(tmp / "venv"), where.stdout
    return env, cwd, python.parent, record


def test_the_installed_wheel_builds_reports_and_generates(installed):
    env, cwd, bin_dir, record = installed

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "tongyi-local"), *args], capture_output=True,
                              text=True, env=env, cwd=cwd, timeout=600)

    # Before the build: one line naming the command a wheel user has.
    before = cli("generate", "-n", "4", "The capital of France is")
    assert before.returncode == 1 and "Traceback" not in before.stderr, before.stderr
    assert "tongyi-local build" in before.stderr and "bootstrap" not in before.stderr

    started = time.monotonic()
    built = cli("build")
    took = time.monotonic() - started
    assert built.returncode == 0, built.stderr
    assert f"preset={record['preset']} key={record['key']}" in built.stdout
    assert "building llama-cpp-python" not in built.stderr and took < 180, (took, built.stderr)
    installed_record = json.loads((bin_dir.parent / build.BUILD_RECORD).read_text())
    assert Path(installed_record["wheel"]).is_relative_to(env["TONGYI_LOCAL_HOME"])

    doctor = cli("doctor", "--json")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == (1 if report["missing_simd"] else 0), doctor.stderr
    assert report["preset"] == record["preset"] and report["llama_cpp_python"] == record["version"]
    shown = cli("doctor").stdout
    nodes = report["numa_nodes"]
    assert f"{len(nodes)} (node{'s' if len(nodes) > 1 else ''} {nodes[0]}" in shown

    starter = cli("models", "starter")
    assert starter.returncode == 0, starter.stderr
    paths = [Path(p) for p in starter.stdout.split()]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert all(p.is_relative_to(env["TONGYI_LOCAL_HOME"]) for p in paths)

    done = cli("generate", "-n", "8", "-t", "0", "--json", "The capital of France is")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["text"].strip() and 1 <= result["usage"]["completion_tokens"] <= 8
