"""Checks of a recipe's data that need files or the tokenizer but not the data itself, run before any stage.

``check_data`` refuses, with one line each: a local file that is missing, empty, not UTF-8, not JSON (its first row,
or the whole of a small ``.json``), not parquet, or whose first row lacks the fields of its format; a synthetic
source whose rows could not fit in this machine's memory (their text alone, a lower bound of what holding them
takes); and a ``max_length`` that the chat template's own tokens before an answer fill, so no row could keep a
token to learn. The data stage reads everything (and says so in one line when a later row is bad).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from mft_bench.data import synthetic_math
from mft_bench.data.formatting import chat_template_of, render_with_spans
from mft_bench.data.local_files import check_local_file, where
from mft_bench.data.sources import SourceSpec, resolve
from mft_bench.errors import MftBenchError

SAMPLE_ROWS = 16  # generated rows measured to size a synthetic source


def check_data(sources: Sequence[SourceSpec], *, seed: int, max_length: int, data_dir: str | None,
               tokenizer: Any) -> None:
    """``MftBenchError`` for the first problem (see the module docstring); hub sources are left to the data stage."""
    for source in sources:
        kind, path = resolve(source, data_dir)
        if kind == "local":
            check_local_file(source, path)
        elif kind == "synthetic":
            check_synthetic_rows(source, seed)
    check_max_length(tokenizer, max_length)


def memory_bytes() -> int | None:
    """This machine's physical memory (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_synthetic_rows(source: SourceSpec, seed: int) -> None:
    """The generated rows' text alone must fit this machine's memory (``rows: 1000000000000`` would never end)."""
    rows = source.rows if source.rows is not None else synthetic_math.DEFAULT_ROWS.get(source.split, 0)
    memory = memory_bytes()
    if not rows or memory is None:
        return
    sample = synthetic_math.generate(source.split, min(rows, SAMPLE_ROWS), seed)
    per_row = sum(len(row["question"].encode()) + len(row["answer"].encode()) for row in sample) / len(sample)
    if rows * per_row > memory:
        raise MftBenchError(f"{where(source)}: rows {rows} would take at least {rows * per_row / 2**30:,.0f} GiB "
                            f"(~{per_row:.0f} bytes of text each), more than this machine's {memory / 2**30:.0f} "
                            "GiB of memory; lower rows")


def check_max_length(tokenizer: Any, max_length: int) -> None:
    """Some row must be able to keep an answer token: the chat template's tokens before the answer of the shortest
    possible conversation (an empty question) must leave room under ``max_length``."""
    conversation = [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]
    text, spans = render_with_spans(conversation, tokenizer, chat_template_of(tokenizer))
    before_answer = len(tokenizer(text[:spans[0][0]], add_special_tokens=False)["input_ids"])
    if before_answer >= max_length:
        raise MftBenchError(f"data.max_length {max_length} leaves no room for an answer: the chat template alone "
                            f"takes {before_answer} tokens before it, so every row would be dropped; raise max_length")
