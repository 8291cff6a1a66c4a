#!/usr/bin/env bash
# The checks that need a GPU, as one run for a lent GPU machine (its minutes are few): the GPU
# tests (training with bf16 autocast, HFEngine on CUDA, a Serve replica that reserves the GPU), then
# serve_load with every system and the limit on CUDA — where prefilling 32 prompts takes
# milliseconds, so #4's p95-TTFT goal can be judged. Everything lands under $OUT (or
# benchmarks/results/gpu). Run from the repository root with the project installed.
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu tests/gpu 2>&1 | tee "$out/tests_gpu.txt"
python benchmarks/serve_load.py --device cuda --out "$out/serve_load_cuda.json" 2>&1 | tail -n 40 | tee "$out/serve_load_cuda.log"
