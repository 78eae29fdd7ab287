#!/usr/bin/env bash
# Build the Triton environment, .venv-triton, next to the main .venv: PyPI's nvidia-pytriton ships a real
# `tritonserver` (Triton Inference Server, Python backend only) that scripts/serve_triton.py starts with an
# ONNX Runtime model behind it, and tests/test_triton*.py against it (`make test` runs this script).
# PyTriton pins numpy<2 and tritonclient~=2.50, so it cannot live in the main venv (numpy 2).
#
# Usage: bash scripts/triton_env.sh           (idempotent: rebuilt only when the pins below change)
#        PYTHON=python3.11 bash scripts/triton_env.sh
#        TRITON_VENV=/tmp/tv bash scripts/triton_env.sh
#
# Prints the venv's python and the directory of libpython3.X.so (Triton's Python-backend stub loads it:
# put it on LD_LIBRARY_PATH; scripts/serve_triton.py does so for the server it starts).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TRITON_VENV:-$REPO/.venv-triton}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi

# The pins: the server, its client library (the protobuf definitions the tests parse config.pbtxt with),
# and ONNX Runtime for the model behind it (1.23 still supports numpy 1.x).
PINS=(
  "nvidia-pytriton==0.7.0"
  "tritonclient[grpc,http]==2.51.0"
  "numpy==1.26.4"
  "onnxruntime==1.23.2"
)

key="$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)"
stamp="$VENV/.deps-$key"
if [ ! -f "$stamp" ]; then
  echo "triton_env.sh: building $VENV (${PINS[*]})" >&2
  rm -rf "$VENV"
  # the main venv's interpreter is itself a venv: build from its base interpreter
  BASE="$("$PY" -c 'import sys; print(sys._base_executable)')"
  "$BASE" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
  touch "$stamp"
fi
"$VENV/bin/python" - <<'PY'
import glob, importlib.metadata as m, sys, sysconfig
for p in ("nvidia-pytriton", "tritonclient", "numpy", "onnxruntime"):
    print(f"{p}=={m.version(p)}")
libdir = sysconfig.get_config_var("LIBDIR")
ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
if not glob.glob(f"{libdir}/libpython{ver}*.so*"):
    sys.exit(f"triton_env.sh: {libdir} has no libpython{ver}.so, which Triton's Python-backend stub loads: use a "
             f"Python built with --enable-shared (PYTHON=... bash scripts/triton_env.sh)")
print("libpython dir:", libdir)
PY
