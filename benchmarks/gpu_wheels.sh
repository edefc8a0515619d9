#!/usr/bin/env bash
# The wheels the GPU suite needs that the lent GPU image (python 3.12, torch 2.11, transformers 5.17) lacks:
# TRL and datasets for the e2e_vs_trl row (and TRL's selective_log_softmax peer in the kernels row), with the
# two datasets needs the image has not. ~1.8 MB into .whl/ (git-ignored); carry it: run(..., carry=[".whl"]).
# Versions: the ones the CPU venv tests (trl 1.16.0 needs transformers >= 4.56.2, datasets >= 4.7).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
