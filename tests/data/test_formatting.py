"""Chat formatting: assistant-only labels (incl. end-of-turn), plain template fallback, truncation counts."""

import logging

import pytest

from mft_bench.backbone import PLAIN_CHAT_TEMPLATE, byte_tokenizer
from mft_bench.data import FormatStats, tokenize_conversations
from mft_bench.data.formatting import (
    IGNORE_INDEX,
    _labels_from_offsets,
    _labels_from_prefix_counts,
    render_with_spans,
)
from mft_bench.errors import MftBenchError

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"},
    {"role": "user", "content": "And in French?"},
    {"role": "assistant", "content": "cinq, très bien"},
]


def labelled_segments(row: dict, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    segments, current = [], []
    for label in row["labels"] + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            segments.append(tokenizer.decode(current))
            current = []
    return segments


def test_labels_are_exactly_assistant_text_plus_eos():
    tok = byte_tokenizer()
    ds = tokenize_conversations([MULTI_TURN], tok, max_length=1024)
    row = ds[0]
    assert labelled_segments(row, tok) == ["2+3 = <<2+3=5>>5\n#### 5<|endoftext|>", "cinq, très bien<|endoftext|>"]
    assert row["labels"][-1] == IGNORE_INDEX  # the newline after EOS is not learned
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(MULTI_TURN, tokenize=False)
    masked = tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == IGNORE_INDEX])
    assert "What is 2+3?" in masked and "<|assistant|>\n" in masked and "Be brief." in masked


def test_plain_template_when_tokenizer_has_none():
    tok = byte_tokenizer()
    tok.chat_template = None
    ds = tokenize_conversations([MULTI_TURN[1:3]], tok, max_length=256)
    text = tok.decode(ds[0]["input_ids"])
    assert text == "<|user|>\nWhat is 2+3?\n<|assistant|>\n2+3 = <<2+3=5>>5\n#### 5<|endoftext|>\n"
    assert labelled_segments(ds[0], tok) == ["2+3 = <<2+3=5>>5\n#### 5<|endoftext|>"]
    tok.eos_token = None
    with pytest.raises(MftBenchError, match="neither a chat template nor an eos_token"):
        tokenize_conversations([MULTI_TURN[1:3]], tok, max_length=256)


def test_chatml_style_template_learns_end_of_turn_not_header():
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    ds = tokenize_conversations([MULTI_TURN], tok, max_length=1024)
    assert labelled_segments(ds[0], tok) == ["2+3 = <<2+3=5>>5\n#### 5<|im_end|>", "cinq, très bien<|im_end|>"]


def test_prefix_count_fallback_matches_offsets():
    tok = byte_tokenizer()
    text, spans = render_with_spans(MULTI_TURN, tok, PLAIN_CHAT_TEMPLATE)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    by_offsets = _labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans)
    assert by_offsets == _labels_from_prefix_counts(text, enc["input_ids"], spans, tok)
    assert sum(label != IGNORE_INDEX for label in by_offsets) > 10


def test_truncation_and_dropping_are_counted_and_logged(caplog):
    tok = byte_tokenizer()
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 200}]
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "never seen"}]
    no_assistant = [{"role": "user", "content": "hello?"}]
    with caplog.at_level(logging.INFO, logger="mft_bench.data.formatting"):
        ds = tokenize_conversations([short, long_answer, long_prompt, no_assistant], tok, max_length=64)
    stats = FormatStats.from_dataset(ds)
    assert stats == FormatStats(conversations=4, kept=2, truncated=2, dropped_no_labels=2, max_length=64)
    assert len(ds) == 2 and max(len(ids) for ids in ds["input_ids"]) == 64
    assert all(len(r["labels"]) == len(r["input_ids"]) for r in ds)
    assert "2 truncated to 64 tokens, 2 dropped" in caplog.text
    # right truncation keeps the start: the long answer's labels are its first tokens
    assert labelled_segments(ds[1], tok)[0] == "y" * (64 - len("<|user|>\nhi\n<|assistant|>\n"))


def test_max_length_that_keeps_no_row_is_refused():
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "never seen"}]
    with pytest.raises(MftBenchError, match="data.max_length 64 keeps no row: all 2 conversations"):
        tokenize_conversations([long_prompt, long_prompt], byte_tokenizer(), max_length=64)


def test_bad_max_length():
    with pytest.raises(MftBenchError, match="max_length must be > 0"):
        tokenize_conversations([MULTI_TURN], byte_tokenizer(), max_length=0)


@pytest.mark.slow
def test_smollm2_chatml_template():
    from transformers import AutoTokenizer

    from mft_bench.backbone import embedded_gguf_path

    path = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert "<|im_start|>" in tok.chat_template
    ds = tokenize_conversations([MULTI_TURN[1:]], tok, max_length=512)
    assert labelled_segments(ds[0], tok) == ["2+3 = <<2+3=5>>5\n#### 5<|im_end|>", "cinq, très bien<|im_end|>"]
    masked = tok.decode([t for t, l in zip(ds[0]["input_ids"], ds[0]["labels"]) if l == IGNORE_INDEX])
    assert "You are a helpful AI assistant" in masked and "<|im_start|>assistant\n" in masked


def test_empty_input_gives_empty_dataset():
    ds = tokenize_conversations([], byte_tokenizer(), max_length=32)
    assert len(ds) == 0 and ds.column_names == ["input_ids", "attention_mask", "labels"]
    assert FormatStats.from_dataset(ds).conversations == 0
