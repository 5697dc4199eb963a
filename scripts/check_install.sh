#!/usr/bin/env bash
# Check that `pip install .` (not editable) makes a working install: build the wheel from a copy of the checkout,
# install it into a fresh venv, check its declared requirements, and ask every ghostvis-* console script for --help
# from outside the checkout. The heavy dependencies (torch, deepspeed, ...) are not downloaded again: the fresh venv
# sees the current environment's site-packages through a .pth line, after its own (so the installed ghostvis wins).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
unset PYTHONPATH

# build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) | (mkdir "$TMP/src" && tar -xf - -C "$TMP/src")
"$PY" -m venv --without-pip "$TMP/venv"
SITE_NEW="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE_NEW/_outer_env.pth"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install -q --no-deps --no-build-isolation "$TMP/src"
bad="$("$VPY" -m pip check 2>&1 | grep -i '^ghostvis' || true)"  # other packages' complaints are not ours
[ -z "$bad" ] || { echo "$bad" >&2; echo "error: the environment does not meet ghostvis's requirements (pyproject.toml)" >&2; exit 1; }

cd "$TMP"  # not the checkout: the installed package must stand alone
"$VPY" - <<'PY'
import ghostvis, launch, data_prep
from ghostvis.shipped import shipped_dir
for m in (ghostvis, launch, data_prep):
    assert "site-packages" in m.__file__, f"{m.__name__} imported from {m.__file__}, not the install"
for name, pattern in (("ds_configs", "zero2.json"), ("recipes", "*.toml")):
    assert any(shipped_dir(name).glob(pattern)), f"{shipped_dir(name)} lacks {pattern}"
PY
# Every console script's entry point answers --help; in one process, so torch & co. are imported once.
"$VPY" - <<'PY'
import contextlib, io, sys
from importlib.metadata import distribution
eps = [ep for ep in distribution("ghostvis").entry_points if ep.group == "console_scripts"]
assert eps, "no console scripts declared"
for ep in eps:
    sys.argv = [ep.name, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            ep.load()()
    except SystemExit as e:
        assert e.code in (0, None), f"{ep.name} --help exited with {e.code}"
    assert "usage:" in out.getvalue(), f"{ep.name} --help printed no usage"
print("install check ok:", len(eps), "console scripts:", " ".join(sorted(ep.name for ep in eps)))
PY
"$TMP/venv/bin/ghostvis-train" --help >/dev/null  # and one of the installed executables itself
