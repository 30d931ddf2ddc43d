#!/usr/bin/env bash
# The one short GPU check, for a session that is lent a device machine (an H200 image with torch,
# transformers, peft, accelerate, pytest; nothing is installed). Run from the repository root there:
#   bash benchmarks/device_check.sh        (writes its outputs under $OUT when set)
# It measures the step-cost targets on the LLaMA-2-7B shape (random weights, no download): FFT vs MFT with
# cached per-step top-k vs the official sort-every-forward approach, band 20-23, 4x2048 tokens per step.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="${OUT:-/tmp/device-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# masking core on the GPU's torch build (tiny models; fast)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_masking.py tests/test_masking_io.py 2>&1 | tail -3
# step cost on the paper's shape: one timed step after one warm-up, 4 micro-batches of 1x2048 tokens
timeout 420 python3 benchmarks/mask_step.py --device cuda --shape llama2-7b --layers 20-23 --batch 1 \
  --seq-len 2048 --grad-accum 4 --steps 1 --warmup 1 --json "$out/mask_step.json" 2>&1 | tee "$out/mask_step.txt"
