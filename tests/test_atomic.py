"""The one atomic writer and the one JSON rendering every file of a run goes through."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mft_bench.atomic import dumps_json, dumps_json_line, write_json_atomic, write_jsonl_atomic


def test_one_rendering_sorted_utf8_strict_with_a_final_newline():
    value = {"b": [1, (2, 3)], "a": {"z": np.float32(0.5), "y": np.int64(7)}, "ü": "café", "nan": math.nan,
             "inf": -math.inf}
    text = dumps_json(value)
    assert text == ('{\n  "a": {\n    "y": 7,\n    "z": 0.5\n  },\n  "b": [\n    1,\n    [\n      2,\n      3\n    ]\n  ],\n'
                    '  "inf": null,\n  "nan": null,\n  "ü": "café"\n}\n')
    assert dumps_json_line(value) == '{"a":{"y":7,"z":0.5},"b":[1,[2,3]],"inf":null,"nan":null,"ü":"café"}'
    assert dumps_json(json.loads(text)) == text  # a file read back renders to the same bytes


def test_writers_write_the_rendering_and_leave_no_temporary_file(tmp_path):
    rows = [{"id": "x/1", "score": math.nan}, {"score": 1.0, "id": "x/2"}]
    write_json_atomic(tmp_path / "sub" / "metrics.json", {"n": 2, "mean": math.inf})
    write_jsonl_atomic(tmp_path / "sub" / "records.jsonl", rows)
    assert (tmp_path / "sub" / "metrics.json").read_bytes() == b'{\n  "mean": null,\n  "n": 2\n}\n'
    assert (tmp_path / "sub" / "records.jsonl").read_text(encoding="utf-8") == "".join(
        dumps_json_line(r) + "\n" for r in rows)
    assert sorted(os.listdir(tmp_path / "sub")) == ["metrics.json", "records.jsonl"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    write_json_atomic(path, {"done": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"done": object()})
    assert json.loads(path.read_text()) == {"done": True} and os.listdir(tmp_path) == ["run.json"]
