"""Chat-format conversations into token ids with loss on assistant tokens only.

The text of a conversation is, with ``chat_template="tokenizer"`` (the default), the tokenizer's chat template, or,
when it has none, the plain Tulu-style template (``mft_bench.backbone.PLAIN_CHAT_TEMPLATE``); with
``chat_template="tulu"``, the official MFT code's Tulu template for every tokenizer
(``mft_bench.backbone.TULU_CHAT_TEMPLATE``, what its ``finetune.py`` trains with by default)::

    <|user|>
    {question}
    <|assistant|>
    {answer}<eos>

The rendered text is tokenized as is (``add_special_tokens=False``: a template that wants a BOS writes it),
the same way generation with ``apply_chat_template`` sees it.

Assistant spans are found by rendering the conversation incrementally: for the assistant message ``i``, the
labelled characters run from the end of ``render(messages[:i], add_generation_prompt=True)`` (the role header
is not learned) to the end of ``render(messages[:i + 1])`` without trailing whitespace, so the end-of-turn
token (``<eos>``, ``<|im_end|>``, ``<|eot_id|>``) is learned (the model learns to stop) but the newline after
it is not. Tokens starting inside a span get labels; every other label is -100.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mft_bench.errors import MftBenchError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class FormatStats:
    """What ``tokenize_conversations`` did; stored as JSON in the dataset's ``info.description``."""

    conversations: int
    kept: int
    truncated: int  # rows longer than max_length, cut on the right
    dropped_no_labels: int  # rows without any assistant token left after truncation
    max_length: int

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> FormatStats:
        return cls(**json.loads(dataset.info.description))


CHAT_TEMPLATES = ("tokenizer", "tulu")


def chat_template_of(tokenizer: Any, choice: str = "tokenizer") -> str:
    """``tokenizer``: the tokenizer's own chat template, else the plain Tulu-style one; ``tulu``: the official
    code's Tulu template whatever the tokenizer has."""
    from mft_bench.backbone import PLAIN_CHAT_TEMPLATE, TULU_CHAT_TEMPLATE

    if choice not in CHAT_TEMPLATES:
        raise MftBenchError(f"data.chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {choice!r}")
    own = getattr(tokenizer, "chat_template", None)
    if choice == "tokenizer" and own:
        return own
    if tokenizer.eos_token is None:  # the Tulu templates end assistant turns with it
        if choice == "tulu":
            raise MftBenchError("the tokenizer has no eos_token, which ends assistant turns in the Tulu chat format; "
                                "set one")
        raise MftBenchError("the tokenizer has neither a chat template nor an eos_token; set one of them")
    return TULU_CHAT_TEMPLATE if choice == "tulu" else PLAIN_CHAT_TEMPLATE


def render_with_spans(messages: Sequence[dict], tokenizer: Any, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans ``[start, end)`` of its assistant turns."""

    def render(part: Sequence[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            list(part), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = render(messages[: i + 1])
        if not full.startswith(through):
            raise MftBenchError(
                "the chat template is not prefix-stable (rendering later turns changes earlier ones), so assistant "
                "tokens cannot be located; use a tokenizer/template without that behaviour"
            )
        start = -1
        if i > 0:
            header = render(messages[:i], generation_prompt=True)
            if through.startswith(header):
                start = len(header)
        if start < 0:  # no generation prompt to anchor on: find the content itself
            start = through.find(message["content"].strip(), len(render(messages[:i])) if i > 0 else 0)
            if start < 0:
                raise MftBenchError("the chat template does not render assistant messages verbatim")
        spans.append((start, len(through.rstrip())))
    return full, spans


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    # Token start offsets are non-decreasing, so each span's tokens are one bisected slice.
    begins = [begin for begin, _ in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a, b = bisect.bisect_left(begins, start), bisect.bisect_left(begins, end)
        labels[a:b] = ids[a:b]
    return labels


def _labels_from_prefix_counts(text: str, ids: list[int], spans: list[tuple[int, int]], tokenizer: Any) -> list[int]:
    # Slow tokenizers have no offsets: a span's tokens are the difference between token counts of prefixes.
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
        labels[a:b] = ids[a:b]
    return labels


def tokenize_with_stats(
    conversations: Sequence[Sequence[dict]], tokenizer: Any, *, max_length: int, chat_template: str = "tokenizer"
) -> tuple[dict[str, list[list[int]]], FormatStats]:
    """Columns ``input_ids``, ``attention_mask``, ``labels`` and what was truncated or dropped."""
    if max_length <= 0:
        raise MftBenchError(f"max_length must be > 0, got {max_length}")
    template = chat_template_of(tokenizer, chat_template)
    rendered = [render_with_spans(conv, tokenizer, template) for conv in conversations]
    texts = [text for text, _ in rendered]
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast) if texts else {"input_ids": []}
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = dropped = 0
    for row, (text, spans) in enumerate(rendered):
        ids = list(encoded["input_ids"][row])
        if fast:
            labels = _labels_from_offsets(ids, encoded["offset_mapping"][row], spans)
        else:
            labels = _labels_from_prefix_counts(text, ids, spans, tokenizer)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
    if conversations and not columns["input_ids"]:  # training on nothing would fail later, less clearly
        raise MftBenchError(f"data.max_length {max_length} keeps no row: all {len(conversations)} conversations lose "
                            "every answer token to truncation; raise max_length")
    stats = FormatStats(len(conversations), len(columns["input_ids"]), truncated, dropped, max_length)
    logger.info(
        "formatting: %d conversations, %d truncated to %d tokens, %d dropped without assistant tokens, %d kept",
        stats.conversations, stats.truncated, max_length, stats.dropped_no_labels, stats.kept,
    )
    return columns, stats


def tokenize_conversations(
    conversations: Sequence[Sequence[dict]], tokenizer: Any, *, max_length: int, chat_template: str = "tokenizer"
) -> datasets.Dataset:
    """A ``datasets.Dataset`` of ``input_ids``, ``attention_mask``, ``labels`` (-100 outside assistant turns).

    ``chat_template``: ``tokenizer`` or ``tulu`` (module docstring). ``FormatStats.from_dataset(ds)`` gives the
    truncated and dropped counts (also logged).
    """
    import datasets

    columns, stats = tokenize_with_stats(conversations, tokenizer, max_length=max_length, chat_template=chat_template)
    features = datasets.Features({name: datasets.Sequence(datasets.Value("int64")) for name in columns})
    info = datasets.DatasetInfo(description=json.dumps(asdict(stats)), features=features)
    return datasets.Dataset.from_dict(columns, info=info)
