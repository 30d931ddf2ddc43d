"""data.selection official: the official MFT code's training rows (datasets' shuffle(seed=42).select(range(N)) per
source, concatenated in order), validation rows from beyond them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402

from mft_bench.data import SourceSpec, build_splits  # noqa: E402
from mft_bench.data import synthetic_math  # noqa: E402
from mft_bench.data.official import validation_quotas  # noqa: E402
from mft_bench.errors import MftBenchError  # noqa: E402

SHARED_GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")


def _write(path: Path, tag: str, n: int) -> Path:
    rows = [{"id": f"{tag}-{i}", "messages": [{"role": "user", "content": f"{tag}-{i}"},
                                                {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ids(conversations: list[list[dict]]) -> list[str]:
    return [c[0]["content"] for c in conversations]


def _official(path: Path, start: int, stop: int) -> list[str]:
    """What the official get_datasets keeps: load, shuffle(seed=42), select(range(N))."""
    return datasets.Dataset.from_json(str(path)).shuffle(seed=42).select(range(start, stop))["id"][:]


def test_train_rows_are_the_official_ones_and_validation_lies_beyond(tmp_path):
    source = _write(tmp_path / "a.jsonl", "a", 50)
    splits = build_splits([SourceSpec(name=str(source), rows=12)], seed=0, validation_rows=5, selection="official")
    assert _ids(splits["train"]) == _official(source, 0, 12)
    assert _ids(splits["validation"]) == _official(source, 12, 17)
    assert not set(_ids(splits["train"])) & set(_ids(splits["validation"]))
    # the recipe seed does not move the official rows (the official code always shuffles with 42) ...
    again = build_splits([SourceSpec(name=str(source), rows=12)], seed=7, validation_rows=5, selection="official")
    assert again == splits
    # ... and the validation size does not change which rows train
    more = build_splits([SourceSpec(name=str(source), rows=12)], seed=0, validation_rows=20, selection="official")
    assert more["train"] == splits["train"]
    # the seeded selection (the default) draws other rows
    seeded = build_splits([SourceSpec(name=str(source), rows=12)], seed=0, validation_rows=5)
    assert set(_ids(seeded["train"])) != set(_ids(splits["train"]))


def test_sources_concatenate_in_recipe_order_with_proportional_validation(tmp_path):
    a, b = _write(tmp_path / "a.jsonl", "a", 40), _write(tmp_path / "b.jsonl", "b", 60)
    sources = [SourceSpec(name=str(a), rows=10), SourceSpec(name=str(b), rows=30)]
    splits = build_splits(sources, seed=0, validation_rows=8, selection="official")
    assert _ids(splits["train"]) == _official(a, 0, 10) + _official(b, 0, 30)
    assert _ids(splits["validation"]) == _official(a, 10, 12) + _official(b, 30, 36)


def test_offline_gsm8k_copy_matches_datasets_shuffle():
    if not SHARED_GSM8K.is_file():
        pytest.skip("no offline GSM8K copy on this machine")
    splits = build_splits([SourceSpec(name="openai/gsm8k", config="main", rows=100)], seed=0, validation_rows=10,
                          data_dir=str(SHARED_GSM8K.parent.parent), selection="official")
    official = datasets.Dataset.from_json(str(SHARED_GSM8K)).shuffle(seed=42)
    assert [c[0]["content"] for c in splits["train"]] == [q.strip() for q in official["question"][:100]]
    assert [c[0]["content"] for c in splits["validation"]] == [q.strip() for q in official["question"][100:110]]


def test_synthetic_source_cuts_its_generator_order():
    splits = build_splits([SourceSpec(name="synthetic_math", rows=6)], seed=3, validation_rows=2, selection="official")
    rows = synthetic_math.generate("train", 8, 3)
    assert _ids(splits["train"]) == [r["question"] for r in rows[:6]]
    assert _ids(splits["validation"]) == [r["question"] for r in rows[6:]]


def test_validation_quotas_follow_the_mixture():
    unbounded = [None] * 6
    assert validation_quotas([10000] * 6, 1000, unbounded) == [167, 167, 167, 167, 166, 166]
    assert validation_quotas([10000] * 3, 1000, unbounded[:3]) == [334, 333, 333]
    assert validation_quotas([10, 30], 8, [100, 100]) == [2, 6]
    assert sum(validation_quotas([3, 5, 7], 11, [None, None, None])) == 11
    # a source with few rows beyond its N (oasst1: 7000 of 7132) gives what it has, the others the rest
    assert validation_quotas([10000, 7000, 9000], 1000, [5000, 132, 100000]) == [457, 132, 411]
    assert validation_quotas([10, 10], 4, [0, 9]) == [0, 4]
    with pytest.raises(MftBenchError, match="only 3 rows beyond their training rows; lower validation_rows"):
        validation_quotas([10, 10], 4, [1, 2])


def test_short_sources_give_what_they_have(tmp_path):
    a, b = _write(tmp_path / "a.jsonl", "a", 11), _write(tmp_path / "b.jsonl", "b", 40)
    sources = [SourceSpec(name=str(a), rows=10), SourceSpec(name=str(b), rows=10)]
    splits = build_splits(sources, seed=0, validation_rows=6, selection="official")
    assert _ids(splits["train"]) == _official(a, 0, 10) + _official(b, 0, 10)
    assert _ids(splits["validation"]) == _official(a, 10, 11) + _official(b, 10, 15)


def test_bad_official_selections_say_what_to_change(tmp_path):
    source = _write(tmp_path / "a.jsonl", "a", 20)
    with pytest.raises(MftBenchError, match="trains on every row when rows is unset.*set rows"):
        build_splits([SourceSpec(name=str(source))], seed=0, validation_rows=2, selection="official")
    with pytest.raises(MftBenchError, match="rows 21 asked but it has only 20; lower rows"):
        build_splits([SourceSpec(name=str(source), rows=21)], seed=0, validation_rows=3, selection="official")
    with pytest.raises(MftBenchError, match="have only 2 rows beyond their training rows"):
        build_splits([SourceSpec(name=str(source), rows=18)], seed=0, validation_rows=3, selection="official")
    with pytest.raises(MftBenchError, match="data.selection must be one of seeded, official"):
        build_splits([SourceSpec(name=str(source), rows=5)], seed=0, validation_rows=3, selection="random")
