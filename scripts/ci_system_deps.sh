#!/usr/bin/env bash
# System packages some tests need (idempotent; safe to re-run in CI):
#   chromium   - headless browser that renders the HTML report in tests/test_report.py
#   qemu-user  - qemu-x86_64, which runs the int8 tests of tests/test_int8.py on an emulated AVX2 CPU
#                (no VNNI: ONNX Runtime's int8 products saturate there), whatever CPU the machine has
# Run as root (or with sudo available). Tests that need these skip with a reason when they are absent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ci_system_deps.sh: not root and no sudo; skipping system packages" >&2; exit 0; fi
fi
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium fonts-dejavu-core)
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null 2>&1; then missing+=(qemu-user); fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages already installed: $(chromium --version 2>/dev/null || true); $(qemu-x86_64 --version 2>/dev/null | head -1 || true)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
chromium --version || true
qemu-x86_64 --version 2>/dev/null | head -1 || true
