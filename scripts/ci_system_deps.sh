#!/usr/bin/env bash
# System packages some tests need (idempotent; safe to re-run in CI):
#   chromium  - headless browser that renders the HTML report in tests/test_report.py
# Run as root (or with sudo available). Tests that need these skip with a reason when they are absent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ci_system_deps.sh: not root and no sudo; skipping system packages" >&2; exit 0; fi
fi
if command -v chromium >/dev/null 2>&1; then
  echo "chromium already installed: $(chromium --version 2>/dev/null || true)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
