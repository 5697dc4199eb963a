#!/usr/bin/env bash
# Build the rustbpe abi3 wheel (one wheel for CPython >= 3.8) and install it into the current python.
#
# Where crates.io is reachable this is a plain `maturin build --release`. Where it is not (an
# offline machine), it builds against Debian's packaged crate sources instead: installs the
# librust-*-dev packages if missing and points cargo at /usr/share/cargo/registry through a
# throwaway CARGO_HOME holding that source replacement (never through ~/.cargo, so the user's
# normal cargo setup is untouched; a --config file would not reach maturin's `cargo metadata`).
#
# Usage: scripts/build_rustbpe.sh            (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRATE="$ROOT/rustbpe"
PYTHON="${PYTHON:-python}"
DEBIAN_REGISTRY=/usr/share/cargo/registry
DEBIAN_PACKAGES="librust-pyo3-dev librust-fancy-regex-dev librust-rayon-dev librust-ahash-dev"

command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs) first" >&2; exit 1; }
"$PYTHON" -m maturin --version >/dev/null 2>&1 || {
  echo "error: maturin is not installed for $PYTHON; run: $PYTHON -m pip install maturin" >&2; exit 1; }

crates_io_reachable() {
  if command -v curl >/dev/null; then
    curl -fsS --max-time 5 -o /dev/null https://index.crates.io/config.json 2>/dev/null
  else
    "$PYTHON" - <<'PY' 2>/dev/null
import urllib.request
urllib.request.urlopen("https://index.crates.io/config.json", timeout=5)
PY
  fi
}

cd "$CRATE"
if crates_io_reachable; then
  echo "crates.io reachable: building with the normal registry"
else
  echo "crates.io unreachable: building offline against Debian's crate sources in $DEBIAN_REGISTRY"
  if ! ls -d "$DEBIAN_REGISTRY"/pyo3-0.17.* "$DEBIAN_REGISTRY"/fancy-regex-0.7.* \
          "$DEBIAN_REGISTRY"/rayon-1.* "$DEBIAN_REGISTRY"/ahash-0.7.* >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { echo "error: need root to apt-get install $DEBIAN_PACKAGES" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBIAN_PACKAGES
  fi
  export CARGO_HOME="$(mktemp -d)"
  trap 'rm -rf "$CARGO_HOME"' EXIT
  cat >"$CARGO_HOME/config.toml" <<TOML
[source.crates-io]
replace-with = "debian"
[source.debian]
directory = "$DEBIAN_REGISTRY"
[net]
offline = true
TOML
fi
# Resolve afresh every time: a lock from the other mode carries checksums this source does not match.
rm -f Cargo.lock

rm -rf target/wheels
"$PYTHON" -m maturin build --release --interpreter "$PYTHON"
"$PYTHON" -m pip install --force-reinstall --no-deps target/wheels/*.whl
"$PYTHON" -c "import rustbpe; print('rustbpe installed:', rustbpe.__file__)"
