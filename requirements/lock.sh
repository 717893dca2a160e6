#!/usr/bin/env bash
# Regenerates the two lock files from pyproject.toml (needs uv: `pip install uv`).
#   demo.lock  what `make demo` installs: moesaic's dependencies, every version and hash pinned.
#              The embedded prose and law corpora are read from these packages, so changing this
#              file changes the demo's numbers.
#   test.lock  what `make test` adds: the test and hf extras, resolved within demo.lock. torch is
#              left out (and its CUDA packages): the Makefile installs the CPU build on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header)
uv pip compile pyproject.toml "${target[@]}" -o requirements/demo.lock
cuda=$(uv pip compile pyproject.toml --extra hf -c requirements/demo.lock "${target[@]}" \
       --no-annotate | grep -oE '^(nvidia-[a-z0-9-]+|cuda-[a-z-]+|triton)==' | tr -d '=')
uv pip compile pyproject.toml --extra test --extra hf --extra eval -c requirements/demo.lock "${target[@]}" \
  --no-emit-package torch $(printf -- '--no-emit-package %s ' $cuda) -o requirements/test.lock
