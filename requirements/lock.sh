#!/usr/bin/env bash
# Regenerate the locks from pyproject.toml's ranges: run after changing a dependency range, or
# to take newer releases. Commit the new locks only once the whole suite passes on them.
#   lock-cpu.txt:  laptops and CI, test and docs extras included; torch's CPU build.
#   lock-cuda.txt: GPU nodes; the CPU lock's pins, with PyPI's CUDA torch and its NVIDIA libraries.
# Needs uv (`pip install uv`). TORCH_CPU_WHEELS: where torch's CPU wheel is found (a folder of
# wheels, or https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
common=(pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet
        --custom-compile-command "bash requirements/lock.sh")
uv pip compile "${common[@]}" --extra test --find-links "${TORCH_CPU_WHEELS:-/opt/wheels}" \
  -o requirements/lock-cpu.txt
# The CUDA lock may not pick other versions: the CPU pins constrain it, torch's build tag aside.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
sed -E 's/^(torch==[^+ ]+)\+cpu/\1/' requirements/lock-cpu.txt > "$constraints"
uv pip compile "${common[@]}" --constraint "$constraints" --no-annotate -o requirements/lock-cuda.txt
