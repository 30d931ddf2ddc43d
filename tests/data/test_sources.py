"""Loading sources: local files, the offline directory, the hub (offline), the generator; error messages."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from mft_bench.data import SourceSpec, load_conversations  # noqa: E402
from mft_bench.data import synthetic_math  # noqa: E402
from mft_bench.data.sources import resolve  # noqa: E402
from mft_bench.errors import MftBenchError  # noqa: E402

SHARED = Path("/work/shared/data")
GSM_ROWS = [
    {"question": f"What is {i}+{i}?", "answer": f"{i}+{i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
    for i in range(12)
]
ALPACA_ROWS = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "loudly", "output": str(i)} for i in range(6)]
MESSAGE_ROWS = [
    {"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def no_offline_dir(monkeypatch):
    monkeypatch.delenv("MFT_BENCH_DATA_DIR", raising=False)


def test_spec_validation():
    with pytest.raises(ValidationError):
        SourceSpec(name="x.jsonl", rows=0)
    with pytest.raises(ValidationError):
        SourceSpec(name="x.jsonl", shuffle=True)
    with pytest.raises(ValidationError):
        SourceSpec(name="x.jsonl", format="sharegpt")
    assert SourceSpec(name="openai/gsm8k").model_dump() == {
        "name": "openai/gsm8k", "kind": "auto", "config": None, "split": "train", "format": "auto", "rows": None
    }


def test_resolve_kinds(tmp_path):
    assert resolve(SourceSpec(name="synthetic_math")) == ("synthetic", None)
    assert resolve(SourceSpec(name="data/missing.jsonl"))[0] == "local"
    assert resolve(SourceSpec(name="openai/gsm8k")) == ("hub", None)
    write_jsonl((tmp_path / "gsm8k").mkdir() or tmp_path / "gsm8k" / "train.jsonl", GSM_ROWS)
    assert resolve(SourceSpec(name="openai/gsm8k"), str(tmp_path)) == ("local", tmp_path / "gsm8k" / "train.jsonl")
    # a relative local path is also found inside the offline directory
    assert resolve(SourceSpec(name="gsm8k/train.jsonl"), str(tmp_path))[1] == tmp_path / "gsm8k" / "train.jsonl"
    with pytest.raises(MftBenchError, match="kind 'synthetic'"):
        resolve(SourceSpec(name="other_generator", kind="synthetic"))


def test_local_jsonl_json_parquet(tmp_path):
    import pandas as pd

    jsonl = write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA_ROWS))
    pd.DataFrame(MESSAGE_ROWS).to_parquet(tmp_path / "chat.parquet")

    gsm = load_conversations(SourceSpec(name=str(jsonl)), seed=0)
    assert len(gsm) == 12 and sorted(c[0]["content"] for c in gsm) == sorted(r["question"] for r in GSM_ROWS)
    alpaca = load_conversations(SourceSpec(name=str(tmp_path / "alpaca.json")), seed=0)
    assert {c[0]["content"] for c in alpaca} >= {"Say 0.\n\nloudly", "Say 1."}
    chat = load_conversations(SourceSpec(name=str(tmp_path / "chat.parquet")), seed=0)
    assert sorted(chat, key=str) == sorted((r["messages"] for r in MESSAGE_ROWS), key=str)


def test_rows_after_seeded_shuffle(tmp_path):
    spec = SourceSpec(name=str(write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)), rows=5)
    a = load_conversations(spec, seed=1)
    assert len(a) == 5 and a == load_conversations(spec, seed=1)
    assert a != load_conversations(spec, seed=2)
    assert [c[0]["content"] for c in a] != [r["question"] for r in GSM_ROWS[:5]]  # shuffled, not the head
    with pytest.raises(MftBenchError, match="rows 50 asked but it has only 12"):
        load_conversations(spec.model_copy(update={"rows": 50}), seed=1)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(MftBenchError) as err:
        load_conversations(SourceSpec(name=str(tmp_path / "nope.jsonl")), seed=0)
    assert str(err.value).startswith(f"data source '{tmp_path / 'nope.jsonl'}': file not found")
    with pytest.raises(MftBenchError, match="unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_conversations(SourceSpec(name=str(tmp_path / "x.csv"), kind="local"), seed=0)


def test_missing_fields_name_source_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(MftBenchError) as err:
        load_conversations(SourceSpec(name=str(path)), seed=0)
    assert str(err.value).startswith(
        f"data source '{path}': rows lack 'question'/'answer' (gsm8k), 'instruction'/'output' (alpaca) or 'messages'"
    )
    with pytest.raises(MftBenchError, match="rows lack 'instruction'/'output' needed by format 'alpaca'"):
        load_conversations(SourceSpec(name=str(write_jsonl(tmp_path / "g.jsonl", GSM_ROWS)), format="alpaca"), seed=0)
    bad = write_jsonl(tmp_path / "bad.jsonl", GSM_ROWS[:2] + [{"question": "q", "answer": None}])
    with pytest.raises(MftBenchError, match=r"row 2: field 'answer'"):
        load_conversations(SourceSpec(name=str(bad)), seed=0)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MftBenchError, match="broken.json is not JSON"):
        load_conversations(SourceSpec(name=str(broken)), seed=0)


def test_hub_failure_offline_points_at_the_offline_dir():
    with pytest.raises(MftBenchError) as err:
        load_conversations(SourceSpec(name="nobody/no-such-dataset-xyz"), seed=0)
    message = str(err.value)
    assert message.startswith("data source 'nobody/no-such-dataset-xyz'") and "MFT_BENCH_DATA_DIR" in message
    assert "\n" not in message


def test_offline_dir_serves_hub_names(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_ROWS)
    monkeypatch.setenv("MFT_BENCH_DATA_DIR", str(tmp_path))
    got = load_conversations(SourceSpec(name="openai/gsm8k", config="main", rows=4), seed=0)
    assert len(got) == 4 and all(c[1]["content"].split("#### ")[1].isdigit() for c in got)


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason="offline GSM8K copy absent")
def test_offline_gsm8k_real_copy(monkeypatch):
    monkeypatch.setenv("MFT_BENCH_DATA_DIR", str(SHARED))
    got = load_conversations(SourceSpec(name="openai/gsm8k", config="main", rows=30), seed=0)
    assert len(got) == 30
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in got)
    assert all(c[1]["content"].rsplit("\n", 1)[1].startswith("#### ") for c in got)
    everything = load_conversations(SourceSpec(name="gsm8k"), seed=0)
    assert len(everything) == 7473


def test_synthetic_source_uses_the_generator():
    got = load_conversations(SourceSpec(name="synthetic_math", rows=8), seed=5)
    rows = synthetic_math.generate("train", 8, seed=5)
    expected = [
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in rows
    ]
    assert got == expected
