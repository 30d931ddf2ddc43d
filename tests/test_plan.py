"""``plan --nproc N --hardware NAME`` and ``reproduce paper --dry-run``: the plan for a node one is about to rent."""

from __future__ import annotations

import math

import pytest

from mft_bench.cli import main, resolve_recipe
from mft_bench.cost import GIB, KNOWN_SHAPES, hardware_by_name
from mft_bench.plan_cost import StageCost, stage_costs, wall_seconds
from mft_bench.recipe import load_recipe
from mft_bench.stages import MANIFEST, Stage, build_plan

LLAMA2 = KNOWN_SHAPES["meta-llama/Llama-2-7b-hf"]


def _paper(name: str = "paper/llama2-7b-math"):
    return load_recipe(resolve_recipe(name))


def _row(out: str, stage: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(stage + " "))


def _costs(tmp_path, hardware: str, nproc: int, recipe=None):
    recipe = recipe or _paper()
    costs, _, _, _ = stage_costs(recipe, build_plan(recipe, tmp_path), hardware_by_name(hardware), nproc)
    return {c.stage.name: c for c in costs}


def test_plan_on_eight_a100_shards_fft_and_replicates_the_others(capsys, tmp_path):
    assert main(["plan", "paper/llama2-7b-math", "--nproc", "8", "--hardware", "a100-80gb", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 x a100-80gb" in out
    assert "fsdp x8" in _row(out, "fft") and "ddp x8" in _row(out, "mft") and "ddp x8" in _row(out, "lora")
    assert "1 GPU" in _row(out, "eval-mft-last-gsm8k")
    assert "sharded state" in out and "gathered layers" in out and "gradient buckets" in out
    assert "GPU-hours" in out and "does not fit" not in out
    assert "mixed precision" in out and "pure bf16 would be 8" in out


def test_fsdp_per_gpu_memory_is_the_sharded_state_plus_one_micro_batch(tmp_path):
    fft = _costs(tmp_path, "a100-80gb", 8)["fft"]
    # fp32 weights, grads, AdamW m and v (16 bytes a parameter) over 8 GPUs, plus activations and gathered layers
    assert 16 * LLAMA2.n_params / 8 < fft.memory_bytes < 16 * LLAMA2.n_params / 8 + 8 * GIB
    assert fft.fits and fft.runs_on == "fsdp x8"
    # the strategy is the one a run on that node would choose
    from mft_bench.translate import run_context

    recipe = _paper()
    memory = hardware_by_name("a100-80gb").memory_bytes
    assert run_context(recipe, "fft", 8, device_bytes=memory).strategy == "fsdp"
    assert run_context(recipe, "mft", 8, device_bytes=memory).strategy == "ddp"


def test_training_scales_with_the_gpu_count(tmp_path):
    one, eight = _costs(tmp_path, "h100-80gb", 1), _costs(tmp_path, "h100-80gb", 8)
    for arm in ("mft", "lora"):
        assert one[arm].seconds / 8 < eight[arm].seconds < one[arm].seconds / 5
    # evaluations run on one GPU each, whatever the count
    assert eight["eval-fft-last-gsm8k"].seconds == pytest.approx(one["eval-fft-last-gsm8k"].seconds)


def test_disk_counts_resume_checkpoints_and_exports(tmp_path):
    costs = _costs(tmp_path, "h100-80gb", 8)
    n = LLAMA2.n_params
    # 2 kept resume checkpoints of fp32 weights + AdamW m, v (12 bytes a parameter), 6 bf16 exports (1/3 epoch x 2)
    assert costs["fft"].disk_bytes == 2 * 12 * n + 6 * 2 * n
    masked = 4 * LLAMA2.linear_weights_per_layer
    # scores + their AdamW states, bit-packed mask exports + masks.safetensors, one dense model/ folder
    assert costs["mft"].disk_bytes == 2 * 12 * masked + 7 * math.ceil(masked / 8) + 2 * n
    assert costs["random_mask"].disk_bytes == math.ceil(masked / 8) + 2 * n
    assert costs["eval-fft-last-gsm8k"].disk_bytes < 10 * 2**20


def test_what_does_not_fit_is_said_in_its_row_and_in_the_total(capsys, tmp_path):
    assert main(["plan", "paper/llama2-7b-math", "--hardware", "a100-40gb", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in _row(out, "fft") and "does not fit" in _row(out, "eval-mft-last-gsm8k")
    assert "does not fit" not in _row(out, "mft")
    total = next(line for line in out.splitlines() if line.startswith("estimated time"))
    assert "does not fit: fft" in total
    # the advice names a batch that does fit
    advice = next(line for line in out.splitlines() if line.startswith("eval-mft-last-gsm8k does not fit"))
    batch = int(advice.split("evaluation.batch_size=")[1].split()[0])
    recipe = _paper()
    recipe.evaluation.batch_size = batch
    assert _costs(tmp_path, "a100-40gb", 1, recipe)["eval-mft-last-gsm8k"].fits
    recipe.evaluation.batch_size = batch + 1
    assert not _costs(tmp_path, "a100-40gb", 1, recipe)["eval-mft-last-gsm8k"].fits


def _stage(tmp_path, name: str, kind: str, done: bool = False) -> Stage:
    stage = Stage(name, kind, {}, folder=tmp_path / name)
    if done:
        stage.folder.mkdir(parents=True)
        (stage.folder / MANIFEST).write_text("{}")
    return stage


def test_evaluation_blocks_are_dealt_out_round_robin(tmp_path):
    costs = [StageCost(_stage(tmp_path, "fft", "train"), seconds=10.0),
             StageCost(_stage(tmp_path, "eval-a", "eval"), seconds=5.0),
             StageCost(_stage(tmp_path, "eval-b", "eval"), seconds=7.0),
             StageCost(_stage(tmp_path, "eval-c", "eval"), seconds=1.0)]
    assert wall_seconds(costs, 1) == 10 + 5 + 7 + 1
    assert wall_seconds(costs, 2) == 10 + max(5 + 1, 7)  # process 0: a, c; process 1: b
    assert wall_seconds(costs, 8) == 10 + 7
    # a cached stage keeps its place in the deal but takes no time
    costs[2] = StageCost(_stage(tmp_path, "eval-b-cached", "eval", done=True), seconds=7.0)
    assert wall_seconds(costs, 2) == 10 + 5 + 1


@pytest.mark.parametrize(("args", "expected"), [
    (["--hardware", "b200"], "unknown hardware 'b200'; known: "),
    (["--nproc", "3"], "global_batch_size 128 cannot be split"),
    (["--nproc", "0"], "--nproc must be at least 1"),
])
def test_bad_plan_arguments_exit_2_with_one_line(args, expected, capsys, tmp_path):
    assert main(["plan", "paper/llama2-7b-math", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err
    if "known" in expected:
        assert all(name in err for name in ("a100-40gb", "a100-80gb", "h100-80gb", "h200"))


def test_reproduce_dry_run_prints_the_bill(capsys, tmp_path):
    assert main(["reproduce", "paper", "--dry-run", "--nproc", "8", "--hardware", "h100-80gb",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    bill = out[out.index("bill on 8 x h100-80gb"):]
    rows = {line.split()[0]: line for line in bill.splitlines()[3:7]}
    assert set(rows) == {"llama2-7b-math", "llama2-7b-coding", "llama2-7b-instruction", "all"}
    node_hours = {name: float(line.split()[1]) for name, line in rows.items()}
    gpu_hours = {name: float(line.split()[2]) for name, line in rows.items()}
    assert gpu_hours["all"] == pytest.approx(sum(v for k, v in gpu_hours.items() if k != "all"), abs=0.15)
    assert all(gpu_hours[name] == pytest.approx(8 * node_hours[name], abs=0.4) for name in rows)
    assert "wall hours x 8 GPUs" in bill and "does not fit" not in out and "NO" not in bill


def test_reproduce_runs_refuse_planning_options(capsys, tmp_path):
    assert main(["reproduce", "paper", "--hardware", "h200", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_replicated_fft_that_does_not_fit_says_how_to_shard(capsys, tmp_path):
    assert main(["plan", "paper/llama2-7b-math", "fft.strategy=ddp", "--nproc", "8", "--hardware", "a100-80gb",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ddp x8" in _row(out, "fft") and "does not fit" in _row(out, "fft")
    assert "gradient buckets" in out and "set fft.strategy=fsdp" in out
