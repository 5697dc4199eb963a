#!/usr/bin/env bash
# Run the test suite (CPU only) and, without arguments, the install check (scripts/check_install.sh).
# The web-page test drives a real headless Chromium: install it when we can.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium + chromium-driver for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
fi
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The whole suite (no arguments) also checks that `pip install .` works: console scripts, data files (~1 min).
[ "$#" -gt 0 ] || bash scripts/check_install.sh
exec python -m pytest -q "$@"
