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
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.deps-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[starter,test]'
  rm -f .venv/.deps-*; touch "$stamp"
fi
tools=()
# llama.cpp's own tools (llama-bench, llama-perplexity, ...) are built here, once, so no test
# spends its time limit compiling them.
case "$job" in bench|test) tools=(--tools) ;; esac
.venv/bin/python -m tongyi_local.build "${tools[@]}"
.venv/bin/tongyi-local models starter >/dev/null

case "$job" in
  run)
    exec .venv/bin/tongyi-local generate --chat -n 96 -t 0 "${@:-Which city is the capital of France?}" ;;
  test)
    set +e
    .venv/bin/python -m pytest "$@"
    rc=$?
    # pytest exits 5 when no test ran: that is a failure here, not a pass.
    [ "$rc" -eq 5 ] && echo "error: no tests ran" >&2
    exit "$rc" ;;
  bench)
    exec .venv/bin/python benchmarks/core_speed.py "$@" ;;
  *)
    echo "usage: ./bootstrap.sh run [PROMPT] | test [PYTEST ARGS] | bench [ARGS]" >&2; exit 2 ;;
esac
