"""One evaluation in a fresh process (``evaluation.worker``): the same records as in-process evaluation, the
worker's one-line error on bad input, a RuntimeError on a crash."""

from __future__ import annotations

import json

import pytest

from mft_bench.backbone import byte_tokenizer, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.evaluation import runner
from mft_bench.evaluation.worker import EvaluationJob, evaluate_in_subprocess, main

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as this process runs (conftest)
OPTIONS = {"n": 6, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=3).eval()
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_worker_records_equal_in_process_evaluation(checkpoint, tmp_path):
    folder, model, tokenizer = checkpoint
    expected = runner.evaluate(model, tokenizer, "synthetic_math", tmp_path / "here", options=OPTIONS, batch_size=4,
                               seed=1)
    job = EvaluationJob(model_path=str(folder), benchmark="synthetic_math", out_dir=str(tmp_path / "worker"),
                        options=OPTIONS, batch_size=4, seed=1, dtype="float32")
    metrics = evaluate_in_subprocess(job, env=ONE_THREAD)
    assert metrics == expected
    here = (tmp_path / "here" / "records.jsonl").read_bytes()
    assert (tmp_path / "worker" / "records.jsonl").read_bytes() == here
    assert len({json.loads(line)["output"] for line in here.splitlines()}) > 1, "outputs too uniform to compare"


def test_bad_input_is_the_workers_one_line_error(checkpoint, tmp_path):
    job = {"model_path": str(checkpoint[0]), "benchmark": "gsm9k", "out_dir": str(tmp_path / "out")}
    with pytest.raises(MftBenchError, match="gsm9k") as err:
        evaluate_in_subprocess(job, env=ONE_THREAD)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    with pytest.raises(MftBenchError, match="gsm9k") as in_process:  # the same message as evaluating here
        runner.evaluate(None, None, "gsm9k", tmp_path / "here", model_path=str(checkpoint[0]))
    assert str(err.value) == " ".join(str(in_process.value).split())


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_a_crash_is_a_runtime_error_with_the_workers_stderr(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in checkpoint[0].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    job = EvaluationJob(model_path=str(broken), benchmark="synthetic_math", out_dir=str(tmp_path / "out"),
                        options=OPTIONS)
    with pytest.raises(RuntimeError, match="exited with code 1") as err:
        evaluate_in_subprocess(job, env=ONE_THREAD)
    assert "Traceback" in str(err.value) and "SafetensorError" in str(err.value)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_job_fields_are_checked_before_a_process_starts(tmp_path):
    with pytest.raises(MftBenchError, match="unknown field.*modelpath"):
        evaluate_in_subprocess({"modelpath": "x", "benchmark": "gsm8k", "out_dir": str(tmp_path)})
    with pytest.raises(MftBenchError, match="missing field.*model_path"):
        EvaluationJob.from_dict({"benchmark": "gsm8k", "out_dir": str(tmp_path)})
    job = EvaluationJob(model_path="m", benchmark="gsm8k", out_dir="o", options={"num_fewshot": 2}, max_length=512)
    assert EvaluationJob.from_json(job.to_json()) == job


def test_worker_main_exit_codes(capsys):
    assert main(["{not json"]) == 2
    assert capsys.readouterr().err.startswith("error: evaluation job is not valid JSON")
    assert main([]) == 2
    assert "usage: python -m mft_bench.evaluation.worker" in capsys.readouterr().err
