#!/usr/bin/env bash
# CI: the mcr-kernels distribution on its own. A fresh venv that sees the installed torch
# (--system-site-packages: no second torch download; --without-pip: the system's pip and
# setuptools, not the older ones a venv bundles) gets ./kernels without dependencies;
# .ci/kernels_alone.py then checks its metadata requires torch and triton only and runs every
# public op once with transformers, timm, tokenizers, PIL, yaml and mcr blocked from import.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python -m venv --system-site-packages --without-pip "$venv"  # pip and setuptools: the system's
MCR_BUILD_CUDA=0 "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation ./kernels
cd "$venv"  # neither the repository nor PYTHONPATH on the path: mcr_kernels must be the venv's
env -u PYTHONPATH "$venv/bin/python" "$OLDPWD/.ci/kernels_alone.py"
