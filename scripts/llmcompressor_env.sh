#!/usr/bin/env bash
# Build (or refresh) the llm-compressor environment (.venv-llmc) for benchmarks/bench_llmcompressor.py:
# llm-compressor 0.14.0.1 on the CPU build of torch 2.13.0, in a venv of its own. Never part of the main
# install or of CI. Idempotent: a second run with the same pins only checks and exits.
#
#   scripts/llmcompressor_env.sh                         # builds .venv-llmc next to the main .venv
#   GPTQ_EXPLORER_LLMC_VENV=/path/venv scripts/llmcompressor_env.sh
#
# torch goes in FIRST, from the local CPU wheel (`pip install --no-index --no-deps torch==2.13.0`), so that
# resolving llm-compressor never pulls a multi-GB CUDA torch; the pins then keep it at 2.13.0 (the install
# stops if pip would change it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTQ_EXPLORER_LLMC_VENV:-.venv-llmc}
REQ=requirements/llmcompressor.txt
PY="$VENV/bin/python"
STAMP="$VENV/.llmc-stamp"
t0=$(date +%s)

want_stamp() { { sha256sum "$REQ" | cut -d' ' -f1; "$PY" -c 'import sys; print(sys.version)'; } 2>/dev/null; }

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
  && "$PY" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("torch", "llmcompressor", "compressed_tensors")))'; then
  echo "llm-compressor env $VENV is up to date ($(($(date +%s) - t0)) s)"
  exit 0
fi

[ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
rm -f "$STAMP"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if ! "$PY" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" --no-index --no-deps "torch==2.13.0" 2>/dev/null || true
fi
before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
# a dry run first: refuse to go on if pip would replace torch (e.g. with a CUDA build)
if "$PY" -m pip install --disable-pip-version-check --dry-run -r "$REQ" 2>/dev/null | grep -qi "would install.* torch-"; then
  echo "pip would replace torch $before; pin it (requirements/llmcompressor.txt has torch==2.13.0)" >&2
  exit 1
fi
"${PIP[@]}" -r "$REQ"
after=$("$PY" -c 'import torch; print(torch.__version__)')
[ "$before" = none ] || [ "$before" = "$after" ] || { echo "torch changed: $before -> $after" >&2; exit 1; }

"$PY" -c 'import llmcompressor, compressed_tensors, torch, transformers
print(f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")' 2>&1 | tail -n 1
want_stamp >"$STAMP"
echo "llm-compressor env $VENV ready in $(($(date +%s) - t0)) s"
