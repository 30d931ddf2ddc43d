"""Run folders that cannot rot: damaged stages redone from what is valid, one run per folder, full disks and
umask, results that depend only on a stage's inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main
from mft_bench.run_folder import RunLock

RECIPE = {
    "name": "mini-integrity",
    "seed": 0,
    "backbone": {"name": "tiny:llama"},
    "data": {"sources": [{"name": "synthetic_math", "rows": 16}], "validation_rows": 4, "max_length": 384},
    "arms": ["pretrained", "fft", "lora"],
    "mask": {"layers": [2, 3]},
    "fft": {"epochs": 1, "learning_rate": 1e-3, "global_batch_size": 4, "per_device_batch_size": 4,
            "warmup_ratio": 0.0, "resume_every_steps": 1},
    "lora": {"epochs": 1, "learning_rate": 1e-3, "global_batch_size": 4, "per_device_batch_size": 4,
             "warmup_ratio": 0.0, "r": 4, "alpha": 8},
    "evaluation": {"batch_size": 4, "benchmarks": [{"name": "synthetic_math", "options": {"n": 4, "max_new_tokens": 16}}]},
}


def _outputs(run_dir: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((run_dir / "stages").glob("*/*"))
            if p.name in ("records.jsonl", "metrics.json", "model.safetensors")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    assert main(["run", str(recipe), "--out", str(tmp / "run")]) == 0
    return recipe, tmp / "run"


def _copy(reference_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(reference_dir, target)
    return target


def _stage(run_dir: Path, prefix: str) -> Path:
    (folder,) = (run_dir / "stages").glob(f"{prefix}-*")
    return folder


def test_a_lost_records_line_is_noticed_and_the_evaluation_redone(reference, tmp_path, caplog):
    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)
    records = _stage(run_dir, "eval-fft-last") / "records.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[1:]))  # one item gone
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    assert "records.jsonl has" in caplog.text and "redoing it" in caplog.text
    assert _outputs(run_dir) == _outputs(reference_dir)
    manifest = json.loads((_stage(run_dir, "eval-fft-last") / "manifest.json").read_text())
    assert manifest["outputs"]["n"] == 4 and "records.jsonl" in manifest["files"]


def test_a_truncated_manifest_means_unfinished_not_a_traceback(reference, tmp_path):
    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)
    manifest = _stage(run_dir, "fft") / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    assert json.loads(manifest.read_text())["stage"] == "fft"
    assert _outputs(run_dir) == _outputs(reference_dir)


def test_a_deleted_model_of_a_finished_stage_is_restored(reference, tmp_path, caplog):
    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)
    (_stage(run_dir, "fft") / "model" / "model.safetensors").unlink()
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    assert "model/model.safetensors is missing" in caplog.text
    assert _outputs(run_dir) == _outputs(reference_dir)


def test_force_leaves_no_reference_to_a_moved_folder(reference, tmp_path, monkeypatch):
    """A --force run that dies before it ends leaves no run.json naming the folders it moved away."""
    from mft_bench.stage_runners import RUNNERS, StageRunner

    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation died")

    monkeypatch.setitem(RUNNERS, "eval", StageRunner(crash, runs_on="shared"))
    with pytest.raises(RuntimeError, match="evaluation died"):
        main(["run", str(recipe), "--out", str(run_dir), "--force", "eval"])
    if (run_dir / "run.json").exists():
        run = json.loads((run_dir / "run.json").read_text())
        assert all((run_dir / e["metrics"]).is_file() for e in run["evaluations"])
    assert list((run_dir / "stages" / ".superseded").glob("run.json-*"))
    monkeypatch.undo()
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    assert _outputs(run_dir) == _outputs(reference_dir)


def test_lora_alone_gives_the_weights_of_the_full_run(reference, tmp_path):
    """What ran before a stage in the same process does not change it: `--force lora` (a process that trains
    LoRA without FFT before it) reproduces the full run's LoRA weights."""
    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)
    assert main(["run", str(recipe), "--out", str(run_dir), "--force", "lora"]) == 0
    lora = "/".join([_stage(run_dir, "lora").name, "model"])
    assert (run_dir / "stages" / lora / "model.safetensors").read_bytes() == \
        (reference_dir / "stages" / lora / "model.safetensors").read_bytes()


def test_one_run_per_folder(reference, tmp_path, capsys):
    recipe, reference_dir = reference
    run_dir = _copy(reference_dir, tmp_path)
    with RunLock(run_dir):
        assert main(["run", str(recipe), "--out", str(run_dir)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and "is in use by pid" in line and str(os.getpid()) in line
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0  # released with the holder


def test_result_files_honour_the_umask(reference):
    _, run_dir = reference
    for path in (run_dir / "run.json", run_dir / "report.json", _stage(run_dir, "fft") / "manifest.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~_current_umask(), path


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    # lazily: the failed run's memory-mapped data files may still be open in this process
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line(reference, small_disk, capsys):
    recipe, _ = reference
    assert main(["run", str(recipe), "--out", str(small_disk / "run")]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mft-bench")]  # (the Trainer's progress aside)
    assert "Traceback" not in err and len(lines) == 1
    assert "no space left on the disk" in lines[0] and "finished stages are kept" in lines[0]
