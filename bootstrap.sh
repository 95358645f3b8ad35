#!/usr/bin/env bash
# One entry point for a fresh machine: ./bootstrap.sh run | test | bench [args...]
#   run   - set everything up, then stream a real chat answer from the packaged chat model
#   test  - set everything up (plus llama.cpp's own tools), then run the whole test suite
#   bench - set everything up (plus llama.cpp's own tools), then run the core benchmark
# Re-runs take seconds: the venv is reused and the llama.cpp build is cached per preset.
# Preset: $TONGYI_LOCAL_PRESET (zen4 | avx2 | native | cuda), default: the one that fits this CPU.
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-run}"; shift || true
# Bytecode is cached under .venv/pycache even where PYTHONDONTWRITEBYTECODE is set (nothing is
# written into source trees): the suite starts hundreds of Python subprocesses, and each would
# otherwise compile every module it imports again.
export PYTHONPYCACHEPREFIX="$PWD/.venv/pycache"
unset PYTHONDONTWRITEBYTECODE
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

# One timing line per setup step on stderr, so a slow step is visible and the total is measured.
started=$EPOCHREALTIME
timed() {  # timed STEP COMMAND...: run it, then print how long it took
  local step="$1" t0=$EPOCHREALTIME; shift
  "$@"
  awk -v s="$step" -v a="$t0" -v b="$EPOCHREALTIME" \
    'BEGIN { printf "[bootstrap] %-22s %7.1f s\n", s, b - a }' >&2
}
make_venv() { [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv; }
# uv resolves and installs the ~130 dependencies in seconds where pip takes minutes; pip stays the
# fallback when uv cannot be had (and is what `tongyi-local build` installs its wheel with).
install_deps() {
  local stamp=".venv/.deps-$(sha256sum < pyproject.toml | cut -c1-16)"
  [ -f "$stamp" ] && return
  if [ -x .venv/bin/uv ] || .venv/bin/python -m pip install --quiet --disable-pip-version-check \
       'uv>=0.5,<1' 2>/dev/null; then
    VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install --quiet --python .venv/bin/python \
      -e '.[starter,test]'
  else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[starter,test]'
  fi
  rm -f .venv/.deps-*; touch "$stamp"
}

timed venv make_venv
timed deps install_deps
timed llama-cpp-python .venv/bin/python -m tongyi_local.build
# llama.cpp's own tools (llama-bench, llama-perplexity, ...) are built here, once, so no test
# spends its time limit compiling them.
case "$job" in bench|test) timed tools .venv/bin/python -m tongyi_local.build --tools ;; esac
timed models .venv/bin/tongyi-local models starter >/dev/null
awk -v a="$started" -v b="$EPOCHREALTIME" \
  'BEGIN { printf "[bootstrap] %-22s %7.1f s\n", "setup total", b - a }' >&2

case "$job" in
  run)
    exec .venv/bin/tongyi-local generate --chat -n 96 -t 0 "${@:-Which city is the capital of France?}" ;;
  test)
    set +e
    # One pytest-xdist worker per CPU, each pinned to its own share (tests/conftest.py), so the
    # suite's llama.cpp thread pools never contend; `./bootstrap.sh test -n 0` runs serially.
    .venv/bin/python -m pytest -n auto --dist worksteal "$@"
    rc=$?
    # pytest exits 5 when no test ran: that is a failure here, not a pass.
    [ "$rc" -eq 5 ] && echo "error: no tests ran" >&2
    exit "$rc" ;;
  bench)
    exec .venv/bin/python benchmarks/core_speed.py "$@" ;;
  *)
    echo "usage: ./bootstrap.sh run [PROMPT] | test [PYTEST ARGS] | bench [ARGS]" >&2; exit 2 ;;
esac
