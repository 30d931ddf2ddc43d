"""data.chat_template tulu: the official MFT code's Tulu format for every backbone, token by token.

The reference below re-implements, independently of our template, the official ``CHAT_TEMPLATES["tulu"]``
(scripts/dataset_processor.py) and ``encode_sft_example`` (scripts/finetune.py): the rendered text tokenized
without special tokens and cut at ``max_seq_length``, then every non-assistant message masked from the token
count of the conversation before it to the token count through it (with the assistant header when an assistant
turn follows), and rows without a labelled token dropped.
"""

import pytest

from mft_bench.backbone import TULU_CHAT_TEMPLATE, byte_tokenizer
from mft_bench.data import tokenize_conversations
from mft_bench.data.formatting import IGNORE_INDEX, chat_template_of
from mft_bench.errors import MftBenchError

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = <<2+3=5>>5\n#### 5"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "Seven."}],
    [{"role": "user", "content": "Write add(a, b) in Python."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "And in French?"}, {"role": "assistant", "content": "cinq, très bien"}],
    [{"role": "user", "content": "A long question " * 12}, {"role": "assistant", "content": "cut before me"}],
]


def official_tulu_text(messages: list[dict], eos: str, add_generation_prompt: bool = False) -> str:
    text = ""
    for i, message in enumerate(messages):
        last = i == len(messages) - 1
        if message["role"] in ("system", "user"):
            text += f"<|{message['role']}|>\n{message['content']}\n"
        elif message["role"] == "assistant":
            text += "<|assistant|>\n" + message["content"] + eos + ("" if last else "\n")
        if last and add_generation_prompt:
            text += "<|assistant|>\n"
    return text


def official_encode(messages: list[dict], tokenizer, max_seq_length: int) -> dict | None:
    def ids(part, generation_prompt=False):
        text = official_tulu_text(part, tokenizer.eos_token, generation_prompt)
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_seq_length)["input_ids"]

    input_ids = ids(messages)
    labels = list(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(ids(messages[:i]))
        followed = i < len(messages) - 1 and messages[i + 1]["role"] == "assistant"
        end = len(ids(messages[: i + 1], generation_prompt=followed))
        labels[start:end] = [IGNORE_INDEX] * len(labels[start:end])
        if end >= max_seq_length:
            break
    if all(label == IGNORE_INDEX for label in labels):
        return None  # the official code filters these rows out
    return {"input_ids": input_ids, "labels": labels}


def assert_like_official(tokenizer, max_length: int) -> None:
    ours = tokenize_conversations(CONVERSATIONS, tokenizer, max_length=max_length, chat_template="tulu")
    expected = [row for row in (official_encode(c, tokenizer, max_length) for c in CONVERSATIONS) if row]
    assert len(ours) == len(expected)
    for row, reference in zip(ours, expected):
        assert row["input_ids"] == reference["input_ids"]
        assert row["labels"] == reference["labels"]


def test_template_renders_the_official_text():
    tok = byte_tokenizer()
    for conversation in CONVERSATIONS:
        for prefix in range(1, len(conversation) + 1):
            for generation_prompt in (False, True):
                ours = tok.apply_chat_template(conversation[:prefix], chat_template=TULU_CHAT_TEMPLATE,
                                               tokenize=False, add_generation_prompt=generation_prompt)
                assert ours == official_tulu_text(conversation[:prefix], tok.eos_token, generation_prompt)


@pytest.mark.parametrize("max_length", [512, 40])
def test_byte_tokenizer_tokens_and_labels_equal_the_official(max_length):
    assert_like_official(byte_tokenizer(), max_length)


def test_tulu_replaces_the_tokenizers_own_template():
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    assert chat_template_of(tok) == tok.chat_template
    assert chat_template_of(tok, "tulu") == TULU_CHAT_TEMPLATE
    tulu = tokenize_conversations(CONVERSATIONS[:1], tok, max_length=512, chat_template="tulu")
    assert tok.decode(tulu[0]["input_ids"]).startswith("<|user|>\nWhat is 2+3?\n<|assistant|>\n")
    own = tokenize_conversations(CONVERSATIONS[:1], tok, max_length=512)
    assert own[0]["input_ids"] != tulu[0]["input_ids"]
    with pytest.raises(MftBenchError, match="data.chat_template must be one of tokenizer, tulu"):
        tokenize_conversations(CONVERSATIONS[:1], tok, max_length=512, chat_template="llama3")


@pytest.mark.slow
@pytest.mark.parametrize("max_length", [512, 30])
def test_smollm2_tokens_and_labels_equal_the_official(max_length):
    from transformers import AutoTokenizer

    from mft_bench.backbone import embedded_gguf_path

    path = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert "<|im_start|>" in tokenizer.chat_template  # its own template is ChatML: tulu must override it
    assert_like_official(tokenizer, max_length)
