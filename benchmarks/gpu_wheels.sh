#!/usr/bin/env bash
# Wheels the GPU check needs that the lent H200 machine lacks (Python 3.12, no network there):
# webdataset + braceexpand (data_loader check), liger-kernel (the Liger configuration of
# train_step), bitsandbytes (the QLoRA check). Run here, in the repository root, once per
# session; the `run` call then carries `.whl` (about 44 MB; the tree must stay under 64 MiB).
# `--without-bitsandbytes` leaves out its 43 MB wheel if the tree gets too large: the QLoRA
# check then says it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=(bitsandbytes==0.50.2)
if [[ "${1:-}" == "--without-bitsandbytes" ]]; then extra=(); fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.8.5 "${extra[@]}"
ls -la .whl
