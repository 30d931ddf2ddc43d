"""The evaluation runner (records, resume, crash safety, determinism) and the benchmark registry."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from mft_bench.atomic import write_json_atomic
from mft_bench.errors import MftBenchError
from mft_bench.evaluation import registry, runner
from mft_bench.evaluation.backends.hf import HFBackend
from mft_bench.evaluation.base import GenerationRequest, Item

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: OpenMP's thread handoffs cost more than they save, and on a shared CPU far more (10x measured).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class EchoNumber:
    """Fake benchmark: "Repeat the number N:" scored by whether the completion's first digits equal N."""

    name = "echo"
    prompt_version = "1"
    scorer_version = "1"
    primary_metric = "exact_match"

    def __init__(self, count: int = 20, template: str = "Repeat the number {n}:", temperature: float = 0.0, n: int = 1):
        self.count, self.template, self.temperature, self.n = count, template, temperature, n

    def items(self, limit: int | None = None) -> list[Item]:
        items = [
            Item(id=f"echo/{i}", data={"gold": str(i * 7)},
                 request=GenerationRequest(self.template.format(n=i * 7) + " " * (i % 5), max_new_tokens=6,
                                           temperature=self.temperature, n=self.n, stop=("\n",)))
            for i in range(self.count)
        ]
        return items[:limit] if limit is not None else items

    def data_hash(self) -> str:
        return "0123456789abcdef"

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        digits = "".join(ch for ch in outputs[0] if ch.isdigit())[:4] or None
        hit = float(digits == item.data["gold"])
        return {"extracted": digits, "scores": {"exact_match": hit, "length": float(len(outputs[0]))},
                "isolation": "none"}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        out = {}
        for key in ("exact_match", "length"):
            values = [r["scores"][key] for r in records]
            stderr = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
            out[key] = {"mean": sum(values) / len(values), "stderr": stderr}
        return out


class CountingBackend:
    """Wraps a backend; raises after ``fail_after`` generate calls (a simulated interruption)."""

    def __init__(self, inner: HFBackend, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.requests = inner, fail_after, 0, 0

    def generate(self, requests: list[GenerationRequest]) -> list[list[str]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.requests += len(requests)
        return self.inner.generate(requests)


class StreamingBackend:
    """Wraps a backend's ``generate_stream``; raises after ``fail_after`` results (a simulated interruption)."""

    def __init__(self, inner: HFBackend, fail_after: int | None = None):
        self.inner, self.fail_after, self.calls, self.results = inner, fail_after, 0, 0

    def generate_stream(self, requests: list[GenerationRequest]):
        self.calls += 1
        for result in self.inner.generate_stream(requests):
            if self.fail_after is not None and self.results >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            self.results += 1
            yield result


@pytest.fixture(scope="module")
def tiny():
    from mft_bench.backbone import load_backbone

    return load_backbone("tiny:llama")


@pytest.fixture
def echo(monkeypatch):
    """Route benchmark name 'echo' to EchoNumber(**options); return a list collecting built backends."""
    monkeypatch.setattr(runner, "validate_benchmark_name", lambda name: None)
    monkeypatch.setattr(runner, "make_benchmark", lambda name, options=None, data_dir=None, **_: EchoNumber(**(options or {})))
    return monkeypatch


def use_backend(monkeypatch, backend_holder: list, fail_after: int | None = None, wrapper=None) -> None:
    def factory(name, model, tokenizer, *, model_path, batch_size, seed, **_):
        inner = HFBackend(model, tokenizer, batch_size=batch_size, seed=seed)
        backend = (wrapper or CountingBackend)(inner, fail_after)
        backend_holder.append(backend)
        return backend

    monkeypatch.setattr(runner, "_backend", factory)


def read(path: Path) -> bytes:
    return path.read_bytes()


def test_records_and_metrics_format(tiny, echo, tmp_path):
    model, tok = tiny
    metrics = runner.evaluate(model, tok, "echo", tmp_path, batch_size=4, limit=10)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [f"echo/{i}" for i in range(10)]
    first = records[0]
    assert set(first) >= {"id", "prompt_hash", "output", "outputs", "extracted", "scores"}
    assert first["prompt_hash"] == runner.prompt_hash(EchoNumber().items()[0].request.prompt)
    assert len(first["prompt_hash"]) == 16 and first["outputs"] == [first["output"]]
    assert "\n" not in "".join(r["output"] for r in records)  # stop string applied
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 10 and metrics["limit"] == 10 and metrics["backend"] == "hf"
    assert metrics["primary_metric"] == "exact_match" and metrics["benchmark"] == "echo"
    assert metrics["versions"] == {"data": "0123456789abcdef", "prompt": "1", "scorer": "1"}
    assert metrics["isolation"] == "none"
    lengths = [r["scores"]["length"] for r in records]
    assert metrics["metrics"]["length"]["mean"] == pytest.approx(sum(lengths) / 10)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_resume_after_interruption_is_byte_identical(tiny, echo, tmp_path):
    model, tok = tiny
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    runner.evaluate(model, tok, "echo", full, batch_size=2)

    backends: list = []
    use_backend(echo, backends, fail_after=1)  # one chunk (4 x batch 2 = 8 items), then "killed"
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(model, tok, "echo", resumed, batch_size=2)
    assert not (resumed / "metrics.json").exists()
    assert len((resumed / "records.jsonl").read_text().splitlines()) == 8
    with open(resumed / "records.jsonl", "a") as f:  # a kill in the middle of the next write
        f.write('{"id": "echo/8", "prompt_ha')

    use_backend(echo, backends)
    metrics = runner.evaluate(model, tok, "echo", resumed, batch_size=2)
    assert backends[-1].requests == 12, "only the missing items are generated"
    assert read(resumed / "records.jsonl") == read(full / "records.jsonl")
    assert read(resumed / "metrics.json") == read(full / "metrics.json")
    assert metrics == json.loads(read(full / "metrics.json"))


def test_streamed_items_are_generated_in_one_call_and_recorded_as_they_finish(tiny, echo, tmp_path):
    # The hf backend streams: every item in one generate_stream call, each record written (flushed) as its item
    # finishes; an interruption keeps those records, and the resumed run ends as a chunked one does.
    model, tok = tiny
    chunked, streamed, killed = tmp_path / "chunked", tmp_path / "streamed", tmp_path / "killed"
    backends: list = []
    use_backend(echo, backends)  # generate only: chunks of 4 x batch 2
    runner.evaluate(model, tok, "echo", chunked, batch_size=2)
    assert backends[-1].calls == 3
    use_backend(echo, backends, wrapper=StreamingBackend)
    runner.evaluate(model, tok, "echo", streamed, batch_size=2)
    assert backends[-1].calls == 1 and backends[-1].results == 20
    assert read(streamed / "records.jsonl") == read(chunked / "records.jsonl")
    assert read(streamed / "metrics.json") == read(chunked / "metrics.json")

    use_backend(echo, backends, fail_after=7, wrapper=StreamingBackend)
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate(model, tok, "echo", killed, batch_size=2)
    kept = [json.loads(line)["id"] for line in (killed / "records.jsonl").read_text().splitlines()]
    assert len(kept) == 7 and kept != sorted(kept, key=lambda i: int(i.split("/")[1])), kept  # finishing order
    use_backend(echo, backends, wrapper=StreamingBackend)
    runner.evaluate(model, tok, "echo", killed, batch_size=2)
    assert backends[-1].results == 13, "only the missing items are generated"
    assert read(killed / "records.jsonl") == read(chunked / "records.jsonl")
    assert read(killed / "metrics.json") == read(chunked / "metrics.json")


def test_sampled_runs_are_deterministic(tiny, echo, tmp_path):
    model, tok = tiny
    options = {"temperature": 0.8, "n": 3, "count": 8}
    runner.evaluate(model, tok, "echo", tmp_path / "a", options=options, batch_size=4, seed=3)
    runner.evaluate(model, tok, "echo", tmp_path / "b", options=options, batch_size=16, seed=3)
    runner.evaluate(model, tok, "echo", tmp_path / "c", options=options, batch_size=4, seed=4)
    a, b, c = (read(tmp_path / x / "records.jsonl") for x in "abc")
    assert a == b and a != c
    assert read(tmp_path / "a" / "metrics.json") == read(tmp_path / "b" / "metrics.json")
    assert all(len(json.loads(line)["outputs"]) == 3 for line in a.decode().splitlines())


def test_finished_folder_is_returned_untouched(tiny, echo, tmp_path):
    model, tok = tiny
    runner.evaluate(model, tok, "echo", tmp_path, limit=4)
    marked = json.loads((tmp_path / "metrics.json").read_text())
    marked["marker"] = "finished earlier"
    (tmp_path / "metrics.json").write_text(json.dumps(marked))
    before = read(tmp_path / "metrics.json"), read(tmp_path / "records.jsonl")

    def no_backend(*args, **kwargs):
        raise AssertionError("a finished evaluation must not generate again")

    echo.setattr(runner, "_backend", no_backend)
    again = runner.evaluate(model, tok, "echo", tmp_path, limit=8)
    assert again["marker"] == "finished earlier"
    assert (read(tmp_path / "metrics.json"), read(tmp_path / "records.jsonl")) == before


def test_changed_prompt_is_an_error(tiny, echo, tmp_path):
    model, tok = tiny
    runner.evaluate(model, tok, "echo", tmp_path, limit=4)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(MftBenchError, match="different prompt"):
        runner.evaluate(model, tok, "echo", tmp_path, limit=4, options={"template": "Say {n}:"})
    # Same prompts, unfinished folder: completes from the records without generating.
    echo.setattr(runner, "_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    assert runner.evaluate(model, tok, "echo", tmp_path, limit=4)["n"] == 4


def test_damaged_middle_line_is_an_error(tiny, echo, tmp_path):
    # echo routes the name; nothing is generated: the damaged file is refused first
    (tmp_path / "records.jsonl").write_text('{"id": "echo/0"\n{"id": "echo/1", "prompt_hash": "x"}\n')
    with pytest.raises(MftBenchError, match="line 1 is not a valid record"):
        runner.evaluate(*tiny, "echo", tmp_path, limit=2)


def test_sigkill_then_rerun_matches_uninterrupted(tiny, echo, tmp_path):
    """A real SIGKILL of a (forked) child mid-evaluation; the rerun completes with identical files."""
    model, tok = tiny
    echo.setattr(runner, "make_benchmark", lambda name, options=None, data_dir=None, **_: EchoNumber(count=24))
    out = tmp_path / "killed"
    pid = os.fork()  # fork, not spawn: the child starts at once with the model already loaded
    if pid == 0:  # child: evaluate until killed
        try:
            torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork; stay single-threaded
            runner.evaluate(model, tok, "echo", out, batch_size=1)
        finally:
            os._exit(0)
    records = out / "records.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (records.exists() and records.stat().st_size > 0):
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert not (out / "metrics.json").exists(), "child finished before it could be killed"
    assert 0 < len(records.read_bytes().splitlines()) < 24

    runner.evaluate(model, tok, "echo", out, batch_size=1)
    runner.evaluate(model, tok, "echo", tmp_path / "clean", batch_size=1)
    assert read(out / "records.jsonl") == read(tmp_path / "clean" / "records.jsonl")
    assert read(out / "metrics.json") == read(tmp_path / "clean" / "metrics.json")


# -- lm_eval routing ------------------------------------------------------------------------------------------
def test_lm_eval_benchmark_is_delegated(tmp_path, monkeypatch):
    calls = []

    from mft_bench.evaluation import lm_eval_task

    def run_lm_eval_task(model, tokenizer, task, out_dir, *, limit, batch_size, num_fewshot, include_path, **extra):
        calls.append(dict(task=task, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, **extra))
        metrics = {"benchmark": f"lm_eval:{task}", "n": 3, "metrics": {"acc": {"mean": 0.5, "stderr": 0.1}}}
        write_json_atomic(Path(out_dir) / "metrics.json", metrics)  # as the real one does, last
        return metrics

    fake = types.ModuleType("mft_bench.evaluation.lm_eval_task")
    fake.run_lm_eval_task = run_lm_eval_task
    fake.resolve_seeds = lm_eval_task.resolve_seeds
    monkeypatch.setitem(sys.modules, "mft_bench.evaluation.lm_eval_task", fake)
    metrics = runner.evaluate("model", "tok", "lm_eval:arc_easy", tmp_path, options={"num_fewshot": 5}, limit=3,
                              batch_size=8, seed=1, data_dir="/mirror")
    # the recipe seed (1) is not lm-eval's: no seeds are passed, so lm-eval's own defaults apply
    assert calls == [dict(task="arc_easy", limit=3, batch_size=8, num_fewshot=5, data_dir="/mirror")]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics and metrics["n"] == 3
    runner.evaluate("model", "tok", "lm_eval:arc_easy", tmp_path)
    assert len(calls) == 1, "finished lm_eval results are reused"
    runner.evaluate("model", "tok", "lm_eval:arc_easy", tmp_path / "seeded", options={"seeds": {"fewshot": 7}})
    assert calls[-1]["seeds"] == {"fewshot": 7} and calls[-1]["num_fewshot"] is None
    with pytest.raises(MftBenchError, match="unknown option"):
        runner.evaluate("model", "tok", "lm_eval:arc_easy", tmp_path / "x", options={"shots": 5})
    bad = [({"seeds": {"few_shot": 1}}, r"options\.seeds: unknown seed\(s\) few_shot; give any of random, numpy"),
           ({"seeds": {"torch": "1"}}, r"options\.seeds\.torch must be an integer"),
           ({"seeds": 3}, r"options\.seeds must be a mapping"),
           ({"num_fewshot": -1}, r"options\.num_fewshot must be a non-negative integer")]
    for options, message in bad:
        with pytest.raises(MftBenchError, match=message):
            runner.evaluate(None, None, "lm_eval:arc_easy", tmp_path / "bad", options=options)
    assert len(calls) == 2 and not (tmp_path / "bad" / "metrics.json").exists()


# -- registry -------------------------------------------------------------------------------------------------
def test_registry_names_and_errors():
    assert set(registry.BENCHMARK_NAMES) >= {"gsm8k", "synthetic_math", "humaneval", "humaneval_plain",
                                             "humaneval_plus", "ifeval"}
    for name in (*registry.BENCHMARK_NAMES, "lm_eval:arc_easy"):
        registry.validate_benchmark_name(name)
    with pytest.raises(MftBenchError, match="unknown benchmark 'gsm9k'.*gsm8k.*ifeval.*lm_eval:<task>"):
        registry.validate_benchmark_name("gsm9k")
    with pytest.raises(MftBenchError, match="names no lm-eval task"):
        registry.validate_benchmark_name("lm_eval:")
    with pytest.raises(MftBenchError, match="unknown benchmark"):
        registry.make_benchmark("nope")
    with pytest.raises(MftBenchError, match="runs through lm-eval"):
        registry.make_benchmark("lm_eval:arc_easy")


def test_make_benchmark_builds_the_right_class(monkeypatch):
    built = []

    class FakeHumanEval:
        def __init__(self, **kwargs):
            built.append(kwargs)

    fake = types.ModuleType("mft_bench.evaluation.humaneval")
    fake.HumanEval = FakeHumanEval
    monkeypatch.setitem(sys.modules, "mft_bench.evaluation.humaneval", fake)
    assert isinstance(registry.make_benchmark("humaneval", {"k": [1]}, data_dir="/data"), FakeHumanEval)
    registry.make_benchmark("humaneval_plain")
    assert built == [{"variant": "olmes", "k": [1], "data_dir": "/data"}, {"variant": "plain"}]
    with pytest.raises(MftBenchError, match="fixes option"):
        registry.make_benchmark("humaneval", {"variant": "plain"})
    with pytest.raises(MftBenchError, match="bad options"):
        monkeypatch.setattr(FakeHumanEval, "__init__", lambda self: None)
        registry.make_benchmark("humaneval", {"unknown": 1})


def test_validation_imports_nothing_heavy():
    code = ("import sys; from mft_bench.evaluation.registry import validate_benchmark_name as v; v('gsm8k'); "
            "heavy = [m for m in ('torch', 'transformers', 'mft_bench.evaluation.gsm8k') if m in sys.modules]; "
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]"


def test_package_exposes_submodules_lazily():
    code = ("import sys, mft_bench.evaluation as e; print('mft_bench.evaluation.registry' in sys.modules); "
            "print(e.registry.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.split() == ["False", "mft_bench.evaluation.registry"]
