"""Training data: sources (hub, local files, offline directory, synthetic generator), mixtures, chat formatting.

Public API::

    SourceSpec                                   one source of a recipe (pydantic)
    load_conversations(source, *, seed, data_dir=None) -> list[list[dict]]
    build_splits(sources, *, seed, validation_rows, data_dir=None) -> {"train": [...], "validation": [...]}
    tokenize_conversations(conversations, tokenizer, *, max_length) -> datasets.Dataset
    FormatStats                                  truncated/dropped counts of a tokenized dataset

``datasets`` and ``transformers`` are imported only when data is actually loaded or tokenized.
"""

from mft_bench.data.formatting import FormatStats, tokenize_conversations
from mft_bench.data.mixture import build_splits
from mft_bench.data.sources import SourceSpec, load_conversations

__all__ = ["FormatStats", "SourceSpec", "build_splits", "load_conversations", "tokenize_conversations"]
