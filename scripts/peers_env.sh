#!/usr/bin/env bash
# Build the peers' own environment, .venv-peers, next to the main .venv: minicons (scripts/bench_peers.py,
# scripts/bench_antiberty.py) and AntiBERTy's runner (those benchmarks and tests/test_real_weights.py; `make
# test` runs this script). Both need transformers < 5, so they cannot live in the main venv (transformers 5).
# torch is pinned to the CPU build used by the main venv (a bare `torch` would pull CUDA wheels).
#
# Usage: bash scripts/peers_env.sh            (idempotent: re-running only checks the pins)
#        PYTHON=python3.11 bash scripts/peers_env.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-peers"
PY="${PYTHON:-$REPO/.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi

if [ ! -x "$VENV/bin/python" ]; then
  # the main venv's interpreter is itself a venv: ask it for its base interpreter
  BASE="$("$PY" -c 'import sys; print(sys._base_executable)')"
  "$BASE" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "transformers>=4.57,<5" "minicons==0.3.39"
# AntiBERTy's own runner (AntiBERTyRunner.pseudo_log_likelihood) needs transformers < 5 too. 0.1.3 is the
# last version that ships its weights in the wheel; --no-deps: torch and transformers are pinned above.
"$VENV/bin/python" -m pip install -q --no-deps "antiberty==0.1.3"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
for p in ("minicons", "antiberty", "transformers", "torch", "tokenizers"):
    print(f"{p}=={m.version(p)}")
PY
