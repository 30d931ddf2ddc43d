"""lm_eval:<task> through lm-eval's Python API on a tiny in-memory model, offline, with local task YAMLs."""

from __future__ import annotations

import json
import time

import pytest

from mft_bench.atomic import dumps_json, dumps_json_line
from mft_bench.backbone import byte_tokenizer, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.evaluation import lm_eval_task
from mft_bench.evaluation.lm_eval_task import run_lm_eval_task

ROWS = [
    {"question": "What is 2 + 3?", "choices": ["5", "7"], "label": 0, "answer": "5"},
    {"question": "What is 4 + 4?", "choices": ["6", "8"], "label": 1, "answer": "8"},
    {"question": "What is 1 + 1?", "choices": ["2", "3"], "label": 0, "answer": "2"},
]

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""

HUB_YAML = """task: tiny_hub
dataset_path: mft-bench-nonexistent-org/nonexistent-dataset
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: answer
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = byte_tokenizer()
    return tiny_model("llama", vocab_size=len(tokenizer), num_layers=2).eval(), tokenizer


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    (tasks / "tiny_gen.yaml").write_text(GEN_YAML.format(data=data))
    (tasks / "tiny_hub.yaml").write_text(HUB_YAML)
    return tasks


def _read(out_dir):
    lines = (out_dir / "records.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    text = (out_dir / "metrics.json").read_text(encoding="utf-8")
    metrics = json.loads(text)
    # written in the project's one rendering (sorted keys), like the other benchmarks' files
    assert text == dumps_json(metrics) and lines == [dumps_json_line(r) for r in records]
    return records, metrics


def test_multiple_choice_loglikelihood(model_and_tokenizer, task_dir, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    tokenizer.pad_token = None  # HFLM would set one on the tokenizer it gets
    side = tokenizer.padding_side
    out = tmp_path / "out_mc"
    metrics = run_lm_eval_task(model, tokenizer, "tiny_mc", out, include_path=str(task_dir), batch_size=2)
    assert tokenizer.pad_token is None and tokenizer.padding_side == side  # caller's tokenizer untouched

    records, written = _read(out)
    assert written == metrics
    assert [r["id"] for r in records] == ["tiny_mc/0", "tiny_mc/1", "tiny_mc/2"]
    assert all(len(r["prompt_hash"]) == 16 for r in records)
    assert all(len(r["output"]) == 2 and all(isinstance(x, float) for x in r["output"]) for r in records)
    # acc per document is 1 exactly when the gold choice has the higher log-likelihood
    for r in records:
        best = max(range(2), key=lambda k: r["output"][k])
        assert r["scores"]["acc,none"] == float(best == r["target"])
    assert metrics["benchmark"] == "lm_eval:tiny_mc" and metrics["n"] == 3
    assert metrics["primary_metric"] == "acc,none"
    mean = sum(r["scores"]["acc,none"] for r in records) / 3
    assert metrics["metrics"]["acc,none"]["mean"] == pytest.approx(mean)
    assert metrics["versions"]["prompt"] == "1.0"
    import lm_eval

    assert metrics["versions"]["lm_eval"] == lm_eval.__version__
    assert len(metrics["versions"]["data"]) == 16


def test_generate_until_with_limit(model_and_tokenizer, task_dir, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    out = tmp_path / "out_gen"
    metrics = run_lm_eval_task(model, tokenizer, "tiny_gen", out, include_path=str(task_dir), limit=2, batch_size=2)
    records, _ = _read(out)
    assert [r["id"] for r in records] == ["tiny_gen/0", "tiny_gen/1"]
    assert all(isinstance(r["output"], str) for r in records)
    assert all(r["extracted"]["none"] == r["output"] for r in records)  # no filter: the raw text is scored
    assert all(r["scores"]["exact_match,none"] in (0.0, 1.0) for r in records)
    assert metrics["n"] == 2 and metrics["limit"] == 2
    assert set(metrics["metrics"]) == {"exact_match,none"}


def test_hub_dataset_offline_is_a_clear_error(model_and_tokenizer, task_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = model_and_tokenizer
    start = time.monotonic()
    with pytest.raises(MftBenchError, match="could not load its dataset"):
        run_lm_eval_task(model, tokenizer, "tiny_hub", tmp_path / "out_hub", include_path=str(task_dir))
    assert time.monotonic() - start < 30  # no retry loop
    assert not (tmp_path / "out_hub" / "metrics.json").exists()


def test_shipped_tasks_materialise_only_with_a_data_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MFT_BENCH_DATA_DIR", raising=False)
    assert {"gsm8k_local", "ifeval_local"} <= set(lm_eval_task.custom_task_names())
    empty = tmp_path / "none"
    empty.mkdir()
    assert lm_eval_task.materialize_custom_tasks(empty) == []
    filled = tmp_path / "filled"
    filled.mkdir()
    written = lm_eval_task.materialize_custom_tasks(filled, data_dir=str(tmp_path / "data"))
    assert "gsm8k_local.yaml" in written
    text = (filled / "gsm8k_local.yaml").read_text()
    assert "${" not in text
    assert str(tmp_path / "data" / "gsm8k" / "test.jsonl") in text
    assert str(lm_eval_task.lm_eval_tasks_dir() / "gsm8k" / "gsm8k-cot.yaml") in text


def test_gsm8k_local_runs_offline(model_and_tokenizer, tmp_path) -> None:
    """The shipped task: lm-eval's gsm8k_cot prompt and filters on a local GSM8K file."""
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    rows = [{"question": "Tom has 3 apples and buys 2 more. How many apples?", "answer": "3 + 2 = 5\n#### 5"}]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tokenizer = model_and_tokenizer
    out = tmp_path / "out_gsm8k"
    metrics = run_lm_eval_task(
        model, tokenizer, "gsm8k_local", out, data_dir=str(tmp_path / "data"), limit=1, gen_kwargs={"max_gen_toks": 8}
    )
    records, _ = _read(out)
    assert [r["id"] for r in records] == ["gsm8k_local/0"]
    assert set(records[0]["scores"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert set(records[0]["extracted"]) == {"strict-match", "flexible-extract"}
    assert records[0]["target"] == "5"
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} == set(metrics["metrics"])
    assert metrics["versions"]["prompt"] == "3.0"
    assert metrics["gen_kwargs"] == {"max_gen_toks": 8}


def _write_ifeval(root, rows) -> None:
    (root / "ifeval").mkdir(parents=True)
    (root / "ifeval" / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ifeval_local_runs_offline_and_missing_punkt_is_clear(model_and_tokenizer, tmp_path, monkeypatch) -> None:
    import nltk

    model, tokenizer = model_and_tokenizer
    no_comma = {"key": 1, "prompt": "Write without commas.", "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}]}
    _write_ifeval(tmp_path / "ok", [no_comma])
    metrics = run_lm_eval_task(model, tokenizer, "ifeval_local", tmp_path / "out_ok", data_dir=str(tmp_path / "ok"),
                               gen_kwargs={"max_gen_toks": 4})
    records, _ = _read(tmp_path / "out_ok")
    assert [r["id"] for r in records] == ["ifeval_local/0"]
    assert set(metrics["metrics"]) == {"prompt_level_strict_acc,none", "inst_level_strict_acc,none",
                                       "prompt_level_loose_acc,none", "inst_level_loose_acc,none"}
    assert records[0]["scores"]["inst_level_loose_acc,none"] in ([0.0], [1.0])  # one verdict per instruction

    sentences = {"key": 2, "prompt": "Answer in fewer than 3 sentences.",
                 "instruction_id_list": ["length_constraints:number_sentences"],
                 "kwargs": [{"relation": "less than", "num_sentences": 3}]}
    _write_ifeval(tmp_path / "nltk", [sentences])
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])
    with pytest.raises(MftBenchError, match=r"nltk\.downloader punkt_tab"):
        run_lm_eval_task(model, tokenizer, "ifeval_local", tmp_path / "out_nltk", data_dir=str(tmp_path / "nltk"),
                         gen_kwargs={"max_gen_toks": 4})


FEWSHOT_YAML = """task: tiny_fewshot
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
fewshot_split: train
test_split: test
num_fewshot: 3
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _sum_rows(pairs):
    return [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in pairs]


@pytest.fixture
def fewshot_task_dir(tmp_path):
    """A task that draws its 3 few-shot examples at random (lm-eval's default sampler) from 16 training rows."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _sum_rows((a, 2 * a + 1) for a in range(16))))
    test.write_text("".join(json.dumps(r) + "\n" for r in _sum_rows((a, 7) for a in range(20, 26))))
    tasks = tmp_path / "fewshot_tasks"
    tasks.mkdir()
    (tasks / "tiny_fewshot.yaml").write_text(FEWSHOT_YAML.format(train=train, test=test))
    return tasks


def test_seeds_and_shots_match_a_plain_lm_eval_run(model_and_tokenizer, fewshot_task_dir, tmp_path) -> None:
    """Through mft-bench's lm_eval path (any recipe seed) the model sees the prompts a plain
    ``lm_eval.simple_evaluate`` shows it, with lm-eval's default seeds and the task's own num_fewshot."""
    import copy

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mft_bench.evaluation import runner

    model, tokenizer = model_and_tokenizer
    ours = runner.evaluate(model, tokenizer, "lm_eval:tiny_fewshot", tmp_path / "ours", batch_size=2, seed=7,
                           options={"include_path": str(fewshot_task_dir)})
    records, _ = _read(tmp_path / "ours")

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=2)
    plain = lm_eval.simple_evaluate(model=lm, tasks=["tiny_fewshot"], log_samples=True,
                                    task_manager=TaskManager(include_path=[str(fewshot_task_dir)],
                                                             include_defaults=False))
    samples = sorted(plain["samples"]["tiny_fewshot"], key=lambda s: s["doc_id"])
    contexts = [s["arguments"][0][0] for s in samples]
    assert all(c.count("Question:") == 4 for c in contexts)  # the task's own 3 shots + the question
    assert [r["prompt_hash"] for r in records] == [lm_eval_task._short_hash(c) for c in contexts]
    assert [r["output"] for r in records] == [[float(x[0][0]) for x in s["resps"]] for s in samples]
    assert ours["metrics"]["acc,none"]["mean"] == pytest.approx(plain["results"]["tiny_fewshot"]["acc,none"])
    config = plain["config"]
    assert ours["seeds"] == {"random": config["random_seed"], "numpy": config["numpy_seed"],
                             "torch": config["torch_seed"], "fewshot": config["fewshot_seed"]}
    assert ours["n_shot"] == {"tiny_fewshot": 3}

    # a recipe may choose other seeds or shots: the few-shot draw then changes
    other = runner.evaluate(model, tokenizer, "lm_eval:tiny_fewshot", tmp_path / "other", batch_size=2,
                            options={"include_path": str(fewshot_task_dir), "seeds": {"fewshot": 7}})
    other_records, _ = _read(tmp_path / "other")
    assert other["seeds"]["fewshot"] == 7
    assert [r["prompt_hash"] for r in other_records] != [r["prompt_hash"] for r in records]
