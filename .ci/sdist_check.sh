#!/usr/bin/env bash
# `make sdist-check`: installs dist/'s source distribution the way README.md says (--no-build-isolation)
# into a fresh virtual environment in a temporary folder, and runs .ci/smoke_installed.py there,
# outside the source tree.
#
# The fresh environment sees the development environment's packages through a .pth file: it gets
# the pinned torch (and setuptools, ninja) without a second multi-GB install, while plastic_ops itself
# is installed into it alone. A .pth folder is appended to sys.path after the environment's own
# site-packages, and the .pth files inside it are not run, so nothing installed in the development
# environment (an editable plastic_ops included) can stand in for the copy under test.
# The build is CPU-only unless SDIST_CHECK_CUDA=1 (the CUDA sources are compiled by `make test`).
set -euo pipefail
dev_python="$1"                 # the development environment's python
repo="$(cd "$(dirname "$0")/.." && pwd)"
sdist="$(ls "$repo"/dist/plastic_ops-*.tar.gz)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

base_python="$("$dev_python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
"$base_python" -m venv --without-pip "$work/venv"
dev_site="$("$dev_python" -c 'import site; print(site.getsitepackages()[0])')"
new_site="$("$work/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
echo "$dev_site" > "$new_site/_development_packages.pth"

mkdir "$work/src"
tar xzf "$sdist" -C "$work/src"
cpu_only=1
[ "${SDIST_CHECK_CUDA:-0}" = 1 ] && cpu_only=0
(cd "$work"/src/plastic_ops-* && PLASTIC_OPS_CPU_ONLY=$cpu_only \
  "$work/venv/bin/python" -m pip install -q --no-build-isolation .)
cd "$work"
"$work/venv/bin/python" "$repo/.ci/smoke_installed.py" "$repo"
