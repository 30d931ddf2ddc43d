"""Wall time of a recipe end to end, cold (empty run folder) then warm (everything cached), in one run.

Targets (tasks/default.yaml on a 2-core CPU): cold <= 15 min, warm <= 10 s. Also prints the `plan`
estimate of the cold run beside the measurement (target: within 2x).

    python benchmarks/end_to_end.py [--recipe tasks/default.yaml] [--out /tmp/e2e]
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed, done.stdout


def parse_estimate(plan_output: str) -> float | None:
    match = re.search(r"estimated time of the remaining stages: ([\d.]+) (s|min|h)", plan_output)
    if not match:
        return None
    return float(match.group(1)) * {"s": 1, "min": 60, "h": 3600}[match.group(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tasks/default.yaml")
    parser.add_argument("--out", default="/tmp/mft-bench-e2e")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cli = [sys.executable, "-m", "mft_bench.cli"]
    _, plan = timed(cli + ["plan", args.recipe, "--out", str(out)])
    estimate = parse_estimate(plan)
    cold, _ = timed(cli + ["run", args.recipe, "--out", str(out)])
    warm, _ = timed(cli + ["run", args.recipe, "--out", str(out)])
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    print(f"{'measure':<28}{'seconds':>10}{'target':>12}{'ratio':>8}")
    print(f"{'cold run':<28}{cold:>10.1f}{900:>12}{cold / 900:>8.2f}")
    print(f"{'warm run (all cached)':<28}{warm:>10.1f}{10:>12}{warm / 10:>8.2f}")
    if estimate:
        print(f"{'plan estimate / cold':<28}{estimate:>10.1f}{'0.5-2.0':>12}{estimate / cold:>8.2f}")


if __name__ == "__main__":
    main()
