"""Mixtures: N rows per source, seeded and deterministic; validation carved from training data only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402

from mft_bench.data import SourceSpec, build_splits  # noqa: E402
from mft_bench.data.mixture import is_test_split  # noqa: E402
from mft_bench.errors import MftBenchError  # noqa: E402


@pytest.fixture
def sources(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"question": f"src-a {i}?", "answer": f"#### {i}"}) + "\n" for i in range(20)))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"instruction": f"src-b {i}", "output": f"o{i}"}) + "\n" for i in range(20)))
    return [SourceSpec(name=str(a), rows=6), SourceSpec(name=str(b), rows=9), SourceSpec(name="synthetic_math", rows=5)]


def _key(conversation: list[dict]) -> str:
    return conversation[0]["content"]


def test_row_counts_per_source(sources):
    splits = build_splits(sources, seed=0, validation_rows=4)
    assert len(splits["train"]) == 16 and len(splits["validation"]) == 4
    everything = [_key(c) for c in splits["train"] + splits["validation"]]
    assert sum(k.startswith("src-a") for k in everything) == 6
    assert sum(k.startswith("src-b") for k in everything) == 9
    assert len(everything) == len(set(everything)) == 20


def test_deterministic_and_seed_dependent(sources):
    first = build_splits(sources, seed=3, validation_rows=4)
    assert first == build_splits(sources, seed=3, validation_rows=4)
    assert first != build_splits(sources, seed=4, validation_rows=4)
    # sources are interleaved by the second shuffle, not concatenated in order
    assert [_key(c)[:5] for c in first["train"][:6]] != ["src-a"] * 6


def test_validation_is_disjoint_and_carved_from_the_pool(sources):
    splits = build_splits(sources, seed=1, validation_rows=5)
    train, validation = {_key(c) for c in splits["train"]}, {_key(c) for c in splits["validation"]}
    assert len(validation) == 5 and not train & validation
    # the same pool with fewer validation rows: validation rows come off the end of it
    smaller = build_splits(sources, seed=1, validation_rows=2)
    assert smaller["train"][: len(splits["train"])] == splits["train"]
    assert smaller["train"] + smaller["validation"] == splits["train"] + splits["validation"]


def test_refuses_test_splits(sources):
    assert is_test_split("test") and is_test_split("TEST[:100]") and not is_test_split("train[:10%]")
    bad = sources + [SourceSpec(name="openai/gsm8k", split="test")]
    with pytest.raises(MftBenchError, match="data source 'openai/gsm8k': split 'test' is a test split"):
        build_splits(bad, seed=0, validation_rows=1)


def test_bad_sizes(sources):
    too_many = r"validation_rows \(20\) must be smaller than the training pool \(20 rows\)"
    with pytest.raises(MftBenchError, match=too_many):
        build_splits(sources, seed=0, validation_rows=20)
    with pytest.raises(MftBenchError, match="data.sources is empty"):
        build_splits([], seed=0, validation_rows=0)
    assert build_splits(sources, seed=0, validation_rows=0)["validation"] == []
