"""The pipeline end to end on a tiny model: caching, --force, SIGKILL-and-resume, determinism."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent

MINI = {
    "name": "mini",
    "seed": 0,
    "backbone": {"name": "tiny:llama"},
    "data": {"sources": [{"name": "synthetic_math", "rows": 24}], "validation_rows": 4, "max_length": 192},
    "arms": ["pretrained", "fft", "mft", "random_mask"],
    "mask": {"layers": [2, 3], "mask_ratio": 0.1},
    "fft": {"epochs": 2, "learning_rate": 1e-3, "global_batch_size": 2, "per_device_batch_size": 2,
            "warmup_ratio": 0.0, "resume_every_steps": 2},
    "mft": {"epochs": 2, "learning_rate": 1e-2, "global_batch_size": 2, "per_device_batch_size": 2,
            "warmup_ratio": 0.0, "resume_every_steps": 2},
    "evaluation": {"batch_size": 4, "benchmarks": [{"name": "synthetic_math", "options": {"n": 6, "max_new_tokens": 48}}]},
}


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(MINI))
    return path


def _outputs(run_dir: Path) -> dict[str, bytes]:
    """Every per-item record and metrics file of a run, by stage folder name (hashes included)."""
    files = {}
    for path in sorted((run_dir / "stages").glob("*/*")):
        if path.name in ("records.jsonl", "metrics.json", "masks.safetensors"):
            files[f"{path.parent.name}/{path.name}"] = path.read_bytes()
    return files


def _cli(*args) -> subprocess.Popen:
    # one intra-op thread, as in this test process (conftest): summation order, and so the trained weights, can
    # depend on the thread count on some CPUs
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mft_bench.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


SECRET = "hf_secret_value_that_must_not_leak_42"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    recipe = _recipe(tmp)
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = SECRET
    try:
        assert main(["run", str(recipe), "--out", str(tmp / "run")]) == 0
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN")
        else:
            os.environ["HF_TOKEN"] = saved
    return recipe, tmp / "run"


def test_no_secret_in_any_result_file(reference_run):
    _, run_dir = reference_run
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    provenance = json.loads((run_dir / "run.json").read_text())["provenance"]
    assert set(provenance) == {"git_commit", "packages", "data_hashes", "prompt_versions"}
    assert provenance["data_hashes"]["training_data"] and provenance["prompt_versions"]["synthetic_math"]


def test_run_writes_report_for_every_arm(reference_run):
    _, run_dir = reference_run
    report = json.loads((run_dir / "report.json").read_text())
    arms = {row["arm"] for row in report["rows"]}
    assert {"pretrained", "fft", "mft", "random_mask"} <= arms
    for row in report["rows"]:
        assert row["n"] == 6 and row["ci_low"] <= row["value"] <= row["ci_high"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["provenance"]["packages"]["torch"] != "absent"
    assert set(run["masks"]) == {"mft", "random_mask"}
    for ext in ("json", "md", "csv", "tex"):
        assert (run_dir / f"report.{ext}").stat().st_size > 0


def test_mft_mask_learned_and_baseline_count_matches(reference_run):
    from mft_bench.masking import load_masks

    _, run_dir = reference_run
    run = json.loads((run_dir / "run.json").read_text())
    mft = load_masks(run_dir / run["masks"]["mft"])
    random = load_masks(run_dir / run["masks"]["random_mask"])
    assert mft.keys() == random.keys()
    for name in mft:
        assert int((~mft[name]).sum()) == int((~random[name]).sum()) == round(0.1 * mft[name].numel())


def test_rerun_is_fully_cached(reference_run, capsys):
    recipe, run_dir = reference_run
    before = _outputs(run_dir)
    start = time.perf_counter()
    assert main(["run", str(recipe), "--out", str(run_dir)]) == 0
    assert time.perf_counter() - start < 30
    out = capsys.readouterr().out
    assert "running" not in out and out.count("cached") >= 8
    assert _outputs(run_dir) == before


def test_force_redoes_stage_and_dependents_keeping_the_old(reference_run, tmp_path, capsys):
    recipe, run_dir = reference_run
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    assert main(["run", str(recipe), "--out", str(copy), "--force", "mft"]) == 0
    out = capsys.readouterr().out
    assert "[running] mft" in out and "[running] eval-mft-last-synthetic_math" in out
    assert "[running] fft" not in out and "[running] eval-fft" not in out
    superseded = sorted(p.name for p in (copy / "stages" / ".superseded").iterdir())
    assert any(name.startswith("mft-") for name in superseded)
    assert any(name.startswith("eval-mft-") for name in superseded)
    assert _outputs(copy) == _outputs(run_dir)  # deterministic on CPU


def _kill_when(proc: subprocess.Popen, run_dir: Path, pattern: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(run_dir.glob(pattern)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"run finished before '{pattern}' appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"'{pattern}' never appeared")


@pytest.mark.slow  # two recipe runs in fresh processes per case
@pytest.mark.parametrize("kill_at", [
    "stages/fft-*/work/checkpoint-*",          # mid-training, after a resume checkpoint
    "stages/mft-*/work/checkpoint-*",          # mid-MFT
    "stages/eval-fft-last-*/records.jsonl",    # mid-evaluation
])
def test_sigkill_then_rerun_gives_identical_results(reference_run, tmp_path, kill_at):
    recipe, reference_dir = reference_run
    run_dir = tmp_path / "run"
    _kill_when(_cli("run", str(recipe), "--out", str(run_dir)), run_dir, kill_at)
    finished = _cli("run", str(recipe), "--out", str(run_dir))
    _, err = finished.communicate(timeout=600)
    assert finished.returncode == 0, err[-3000:]
    assert _outputs(run_dir) == _outputs(reference_dir)
    report = json.loads((run_dir / "report.json").read_text())
    reference = json.loads((reference_dir / "report.json").read_text())
    assert report["rows"] == reference["rows"] and report["comparisons"] == reference["comparisons"]


@pytest.mark.slow  # a whole run with one process per evaluation
def test_evaluations_in_fresh_processes_write_the_same_records(reference_run, tmp_path):
    """Each evaluation in a process of its own on the arm's saved folder (how vLLM stages run; the pretrained tiny
    model is exported for it) gives the records of the in-process evaluation."""
    recipe, reference_dir = reference_run
    fresh = yaml.safe_load(recipe.read_text())
    fresh["evaluation"]["fresh_process"] = True
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(fresh))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    assert _outputs(tmp_path / "run") == _outputs(reference_dir)
    (pretrained_eval,) = (tmp_path / "run" / "stages").glob("eval-pretrained-*")
    assert (pretrained_eval / "model" / "config.json").is_file()


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_checkpoints_selected_on_validation_and_labelled_when_on_test(tmp_path):
    """Every export of every training arm (LoRA's too) evaluated; rows of the validation-selected checkpoints and,
    asked for, of the test-selected ones (labelled); MFT and the structured L1 baseline start from FFT's best
    checkpoint on the test benchmark, which the plan ran before them."""
    from mft_bench.masking import load_masks

    recipe = {**MINI, "name": "mini-ckpt", "arms": ["pretrained", "fft", "mft", "lora", "l1_mask"]}
    for arm in ("fft", "mft"):
        recipe[arm] = {**MINI[arm], "save_every": 0.5}
    recipe["lora"] = {**MINI["fft"], "save_every": 0.5, "r": 4, "alpha": 8}
    recipe["mask"] = {**MINI["mask"], "start_from": "best-test"}
    recipe["evaluation"] = {**MINI["evaluation"], "checkpoints": "all", "test_selected": True}
    path = tmp_path / "ckpt.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    fft_scores = {}
    for arm in ("fft", "mft", "lora"):
        test = {e["checkpoint"]: e for e in run["evaluations"] if e["arm"] == arm and e["split"] == "test"}
        val = {e["checkpoint"]: e for e in run["evaluations"] if e["arm"] == arm and e["split"] == "validation"}
        assert list(test) == list(val) == ["ckpt-1", "ckpt-2", "ckpt-3", "last"]  # 2 epochs / 0.5: 4 exports
        steps = [test[label]["step"] for label in test]
        assert steps == sorted(steps) and len(set(steps)) == 4
        if arm == "fft":
            fft_scores = {e["step"]: json.loads((tmp_path / "run" / e["metrics"]).read_text())["metrics"]
                          ["exact_match_flexible"]["mean"] for e in test.values()}
    best = max(sorted(fft_scores), key=lambda step: fft_scores[step])  # earliest of the best
    for arm in ("mft", "l1_mask"):
        start = run["mask_start"][arm]
        assert (start["from"], start["step"]) == ("best-test", best) and "test-selected" in start["rule"]
    from transformers import AutoModelForCausalLM

    from mft_bench.errors import MftBenchError

    for step in fft_scores:  # the masks were made on that checkpoint's weights, not on another's
        (export,) = (tmp_path / "run" / "stages").glob(f"fft-*/work/exports/step-{step}")
        base = AutoModelForCausalLM.from_pretrained(export)
        if step == best:
            load_masks(tmp_path / "run" / run["masks"]["mft"], base_model=base)
        else:
            with pytest.raises(MftBenchError, match="base"):
                load_masks(tmp_path / "run" / run["masks"]["mft"], base_model=base)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    arms = {row["arm"] for row in report["rows"]}
    assert {"fft@val", "mft@val", "lora@val", "fft@test", "mft@test", "lora@test"} <= arms
    assert not {"pretrained@test", "l1_mask@test"} & arms  # one checkpoint: nothing to select
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "mft (test-selected‡)" in markdown and "## Test-selected checkpoints" in markdown
    assert "optimistic" in markdown and "## Mask starting point" in markdown


def test_lm_eval_task_through_the_pipeline(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MFT_BENCH_DATA_DIR", str(shared_data))
    recipe = {**MINI, "name": "mini-lm-eval", "arms": ["pretrained"],
              "evaluation": {"batch_size": 4, "benchmarks": [
                  {"name": "lm_eval:gsm8k_local", "limit": 2,
                   "options": {"num_fewshot": 0, "gen_kwargs": {"max_gen_toks": 8}}}]}}
    path = tmp_path / "lm_eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = [row for row in report["rows"] if row["benchmark"] == "lm_eval:gsm8k_local"]
    assert rows and all(row["n"] == 2 for row in rows)


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_fft_continued_is_mft_compute_matched(tmp_path):
    """The control arm trains the FFT model on for exactly MFT's optimizer steps, on the same rows in the same
    order (equal tokens seen at every step), with FFT's learning rate and schedule shape, and is compared with MFT."""
    recipe = {**MINI, "name": "mini-control", "arms": ["pretrained", "fft", "mft", "fft_continued"]}
    recipe["mft"] = {**MINI["mft"], "epochs": 1}  # MFT shorter than FFT: the control follows MFT's length
    path = tmp_path / "control.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    stages = tmp_path / "run" / "stages"

    def history(arm: str) -> list[dict]:
        (folder,) = stages.glob(f"{arm}-*/log_history.json")
        return [e for e in json.loads(folder.read_text()) if "loss" in e]

    mft, control, fft = history("mft"), history("fft_continued"), history("fft")
    assert [e["step"] for e in control] == [e["step"] for e in mft] and len(control) < len(fft)
    assert [e["num_input_tokens_seen"] for e in control] == [e["num_input_tokens_seen"] for e in mft]
    assert control[0]["learning_rate"] == fft[0]["learning_rate"] == MINI["fft"]["learning_rate"]  # no warmup
    assert control[-1]["learning_rate"] < control[0]["learning_rate"]  # FFT's linear decay, over MFT's length
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["mask_start"]["fft_continued"]["step"] == run["mask_start"]["mft"]["step"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert any(c["arm_a"] == "mft" and c["arm_b"] == "fft_continued" for c in report["comparisons"])
