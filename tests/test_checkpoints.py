"""Which checkpoint a stage reads: planned labels to export steps, and the FFT checkpoint the masks start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_bench.checkpoints import export_path, export_step, start_step
from mft_bench.errors import MftBenchError
from mft_bench.recipe import load_recipe
from mft_bench.stages import Stage, checkpoint_labels

ROOT = Path(__file__).resolve().parent.parent


def _stage(tmp_path: Path, name: str, outputs: dict, *, kind: str = "train", checkpoint: str = "last",
           benchmark: str | None = None) -> Stage:
    stage = Stage(name, kind, {}, arm="fft", checkpoint=checkpoint, benchmark=benchmark, folder=tmp_path / name)
    stage.folder.mkdir(parents=True)
    (stage.folder / "manifest.json").write_text(json.dumps({"outputs": outputs}))
    return stage


@pytest.fixture
def fft(tmp_path):
    return _stage(tmp_path, "fft", {
        "export_steps": [3, 5, 8, 10],
        "checkpoints": [{"step": s, "path": f"work/exports/step-{s}"} for s in (3, 5, 8, 10)],
        "validation_loss": {"3": 1.2, "5": 0.9, "8": 0.9, "10": 1.0},
    })


def _evaluation(tmp_path, label: str, score: float) -> Stage:
    stage = _stage(tmp_path, f"eval-fft-{label}-gsm8k", {}, kind="eval", checkpoint=label, benchmark="gsm8k")
    (stage.folder / "metrics.json").write_text(json.dumps(
        {"primary_metric": "exact_match_flexible", "metrics": {"exact_match_flexible": {"mean": score}}}))
    return stage


def test_labels_are_planned_by_index_and_resolved_to_steps(fft):
    recipe = load_recipe(ROOT / "tasks" / "paper" / "llama2-7b-math.yaml")
    assert checkpoint_labels(recipe, "fft") == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4", "ckpt-5", "last"]
    assert checkpoint_labels(recipe, "random_mask") == ["last"]
    assert [export_step(fft, label) for label in ("ckpt-1", "ckpt-3", "last")] == [3, 8, 10]
    assert export_path(fft, 5) == fft.folder / "work/exports/step-5"
    with pytest.raises(MftBenchError, match="no export at step 4"):
        export_path(fft, 4)


def test_start_from_last_or_a_named_step(fft):
    assert start_step("last", fft, [])["step"] == 10
    assert start_step("step-5", fft, []) == {"from": "step-5", "step": 5,
                                             "rule": "FFT checkpoint at step 5 (the recipe's choice)"}
    with pytest.raises(MftBenchError, match="no export at that step.*3, 5, 8, 10"):
        start_step("step-4", fft, [])


def test_best_on_the_test_benchmark_ties_go_to_the_earliest(fft, tmp_path):
    selection = [_evaluation(tmp_path, label, score)
                 for label, score in (("ckpt-1", 0.40), ("ckpt-2", 0.47), ("ckpt-3", 0.47), ("last", 0.45))]
    chosen = start_step("best-test", fft, selection)
    assert chosen["step"] == 5 and "test-selected" in chosen["rule"]
    assert chosen["candidates"] == {"3": 0.40, "5": 0.47, "8": 0.47, "10": 0.45}


def test_best_on_validation_falls_back_to_the_validation_loss(fft):
    chosen = start_step("best-val", fft, [])
    assert chosen["step"] == 5 and "validation loss" in chosen["rule"]  # 0.9 at steps 5 and 8: the earliest
