"""Check a finished run folder the way the device check needs: every stage folder complete, the evaluable exports
in the recipe's dtype, the trained master weights in fp32 (``precision: mixed``), a report row for every arm and
benchmark. One line per problem; exit status 1 if there is any.

    python3 benchmarks/device_smoke_verify.py RUN_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from safetensors import safe_open

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
FLOATING = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def tensor_dtypes(path: Path) -> Counter:
    with safe_open(str(path), "pt") as handle:
        return Counter(handle.get_slice(key).get_dtype() for key in handle.keys())


def is_resume_checkpoint(path: Path, run_dir: Path) -> bool:
    return any(part.startswith("checkpoint-") for part in path.relative_to(run_dir).parts)


def verify(run_dir: Path, dtype: str) -> tuple[list[str], list[str]]:
    """(what was checked, problems)."""
    expected = SAFETENSORS_DTYPES[dtype]
    checked, problems = [], []
    stages = sorted(p for p in (run_dir / "stages").iterdir() if p.is_dir())
    incomplete = [p.name for p in stages if not (p / "manifest.json").is_file()]
    problems += [f"stage {name}: no manifest.json" for name in incomplete]
    checked.append(f"{len(stages)} stage folders, {len(stages) - len(incomplete)} with a manifest")

    exports = masters = 0
    for path in sorted((run_dir / "stages").rglob("*.safetensors")):
        floating = {d for d in tensor_dtypes(path) if d in FLOATING}
        where = path.relative_to(run_dir)
        if is_resume_checkpoint(path, run_dir):
            # a trained arm's resume checkpoint holds the weights the optimizer updates: fp32 masters when mixed
            if path.name == "model.safetensors" and path.parts[-4].split("-")[0] in ("fft", "mft"):
                masters += 1
                if floating != {"F32"}:
                    problems.append(f"{where}: trained weights {sorted(floating)}, expected fp32 master copies")
            continue
        exports += 1
        if floating - {expected}:
            problems.append(f"{where}: tensors in {sorted(floating)}, expected only {expected}")
    checked.append(f"{exports} evaluable safetensors files in {expected}, {masters} resume checkpoints in F32")

    run = json.loads((run_dir / "run.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    rows = {(row["arm"], row["benchmark"]) for row in report["rows"]}
    for arm in run["arms"]:
        for benchmark in report["benchmarks"]:
            if (arm, benchmark) not in rows:
                problems.append(f"report: no row for arm {arm} on {benchmark}")
    checked.append(f"report rows for {len(run['arms'])} arms x {len(report['benchmarks'])} benchmarks")
    return checked, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dtype", choices=sorted(SAFETENSORS_DTYPES), default="bfloat16")
    args = parser.parse_args()
    checked, problems = verify(args.run_dir, args.dtype)
    for line in checked:
        print(f"verify: {line}")
    for line in problems:
        print(f"verify: PROBLEM {line}")
    print(f"verify: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
