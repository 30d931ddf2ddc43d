"""A recipe on 2 CPU processes (gloo), as on a 2-GPU node: same report as 1 process, complete stage folders.

Runs: 1 process in this test process (the reference), ``--nproc 2`` with FFT sharded by FSDP, and the same recipe in
bf16 (the paper recipes' precision) on 1 process and under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main

pytestmark = pytest.mark.slow

RECIPE = {
    "name": "mini-distributed",
    "seed": 0,
    "backbone": {"name": "tiny:llama"},
    "data": {"sources": [{"name": "synthetic_math", "rows": 20}], "validation_rows": 4, "max_length": 384},
    "arms": ["pretrained", "fft", "mft", "lora", "random_mask"],
    "mask": {"layers": [2, 3], "mask_ratio": 0.1},
    # 16 training rows, 4 a step: 4 steps; 2 rows per process and micro-batch, so 1 process accumulates 2
    "fft": {"epochs": 1, "learning_rate": 1e-3, "global_batch_size": 4, "per_device_batch_size": 2,
            "warmup_ratio": 0.0},
    "mft": {"epochs": 1, "learning_rate": 1e-2, "global_batch_size": 4, "per_device_batch_size": 2,
            "warmup_ratio": 0.0},
    # no dropout: its random draws come from each process's own generator, so they cannot match 1 process's
    "lora": {"epochs": 1, "learning_rate": 1e-3, "global_batch_size": 4, "per_device_batch_size": 2,
             "warmup_ratio": 0.0, "r": 4, "alpha": 8, "dropout": 0.0},
    "evaluation": {"batch_size": 4, "benchmarks": [
        {"name": "synthetic_math", "options": {"n": 5, "max_new_tokens": 16}},
        {"name": "humaneval", "limit": 3, "options": {"max_new_tokens": 16}},
    ]},
}


def _write(tmp: Path, **changes) -> Path:
    recipe = {**RECIPE, **changes}
    path = tmp / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _two_processes(command: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])


def _rows(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    return {(r["arm"], r["benchmark"], r["metric"]): (r["n"], r["value"]) for r in report["rows"]}


def _stage(run_dir: Path, name: str) -> Path:
    (folder,) = (run_dir / "stages").glob(f"{name}-*")
    return folder


def _losses(run_dir: Path, arm: str) -> list[tuple[int, float]]:
    history = json.loads((_stage(run_dir, arm) / "log_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    recipe = _write(tmp)
    assert main(["run", str(recipe), "--out", str(tmp / "one")]) == 0
    _two_processes([sys.executable, "-m", "mft_bench.cli", "run", str(recipe), "--out", str(tmp / "two"),
                    "--nproc", "2", "fft.strategy=fsdp"])
    return tmp / "one", tmp / "two"


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    recipe = _write(tmp, name="mini-bf16", backbone={"name": "tiny:llama", "dtype": "bfloat16"},
                    arms=["pretrained", "fft", "mft", "lora"])
    assert main(["run", str(recipe), "--out", str(tmp / "one")]) == 0
    _two_processes([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "mft_bench.cli", "run", str(recipe), "--out", str(tmp / "two")])
    return tmp / "one", tmp / "two"


def test_two_processes_give_the_report_of_one(fp32_runs):
    one, two = fp32_runs
    assert _rows(two) == _rows(one)


@pytest.mark.parametrize("arm", ["fft", "mft", "lora"])
def test_same_steps_on_the_same_rows(fp32_runs, arm):
    """The global batch fixes the optimizer steps and the rows in each: the per-step losses (each the mean over its
    step's rows) agree between 1 and 2 processes."""
    one, two = fp32_runs
    steps_one, steps_two = _losses(one, arm), _losses(two, arm)
    assert [s for s, _ in steps_one] == [s for s, _ in steps_two] == [1, 2, 3, 4]
    assert [round(v, 4) for _, v in steps_one] == [round(v, 4) for _, v in steps_two]


def test_strategy_and_accumulation_recorded(fp32_runs):
    one, two = fp32_runs
    manifests = {arm: json.loads((_stage(two, arm) / "manifest.json").read_text())["outputs"]
                 for arm in ("fft", "mft", "lora")}
    assert {arm: (m["strategy"], m["processes"], m["gradient_accumulation_steps"]) for arm, m in manifests.items()} \
        == {"fft": ("fsdp", 2, 1), "mft": ("ddp", 2, 1), "lora": ("ddp", 2, 1)}
    assert json.loads((_stage(one, "fft") / "manifest.json").read_text())["outputs"]["gradient_accumulation_steps"] == 2


def test_every_stage_complete_and_every_item_recorded_once(fp32_runs):
    from transformers import AutoModelForCausalLM

    _, two = fp32_runs
    run = json.loads((two / "run.json").read_text())
    assert len(run["evaluations"]) == 5 * 2
    for entry in run["evaluations"]:
        metrics = json.loads((two / entry["metrics"]).read_text())
        lines = (two / entry["records"]).read_text().splitlines()
        ids = [json.loads(line)["id"] for line in lines]
        assert len(ids) == len(set(ids)) == metrics["n"] > 0
    for folder in (two / "stages").iterdir():
        assert (folder / "manifest.json").is_file(), folder
    # the FFT model was sharded while it trained; its folder is a whole checkpoint that loads
    AutoModelForCausalLM.from_pretrained(_stage(two, "fft") / "model")


def test_bf16_recipe_on_two_processes_matches_one(bf16_runs):
    from safetensors.torch import load_file

    one, two = bf16_runs
    for arm in ("fft", "mft", "lora"):
        assert [round(v, 3) for _, v in _losses(one, arm)] == [round(v, 3) for _, v in _losses(two, arm)]
        weights = load_file(_stage(two, arm) / "model" / "model.safetensors")
        assert {str(t.dtype) for t in weights.values()} == {"torch.bfloat16"}
    assert _rows(two).keys() == _rows(one).keys()
