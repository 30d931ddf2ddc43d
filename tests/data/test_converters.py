"""Row shapes -> chat messages, and format detection."""

import pytest

from mft_bench.data.converters import detect_format, to_messages
from mft_bench.errors import MftBenchError

GSM = {"question": "Tom has 3 bags of 4 apples. How many apples?", "answer": "3*4 = <<3*4=12>>12\n#### 12"}


def test_gsm8k_keeps_worked_solution():
    assert to_messages(GSM, "gsm8k") == [
        {"role": "user", "content": GSM["question"]},
        {"role": "assistant", "content": GSM["answer"]},
    ]


@pytest.mark.parametrize("extra, expected", [("", "Sum."), (None, "Sum."), ("2 and 3", "Sum.\n\n2 and 3")])
def test_alpaca_appends_input_only_when_present(extra, expected):
    row = {"instruction": "Sum.", "input": extra, "output": "5"}
    assert to_messages(row, "alpaca") == [
        {"role": "user", "content": expected},
        {"role": "assistant", "content": "5"},
    ]


def test_messages_pass_through_and_drop_extra_keys():
    msgs = [{"role": "system", "content": "s", "name": None}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": msgs}, "messages") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
    ]


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "human", "content": "x"}], "role 'human'"),
        ([{"role": "user"}], "messages[0] needs 'role' and 'content'"),
        ([], "non-empty list"),
        ([{"role": "user", "content": 3}], "must be a string"),
    ],
)
def test_messages_validation(messages, fragment):
    with pytest.raises(MftBenchError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        to_messages({"messages": messages}, "messages")


@pytest.mark.parametrize(
    "row, fmt",
    [
        (GSM, "gsm8k"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"messages": [], "question": "q", "answer": "a"}, "messages"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_names_the_fields_it_needs():
    with pytest.raises(MftBenchError) as err:
        detect_format({"prompt": "x", "completion": "y"})
    message = str(err.value)
    assert "'question'/'answer' (gsm8k)" in message and "'instruction'/'output' (alpaca)" in message
    assert "'messages'" in message and "completion" in message


def test_auto_format_and_empty_field():
    assert to_messages(GSM, "auto")[1]["content"].endswith("#### 12")
    with pytest.raises(MftBenchError, match="'answer'"):
        to_messages({"question": "q", "answer": "  "}, "gsm8k")
    with pytest.raises(MftBenchError, match="unknown data format"):
        to_messages(GSM, "sharegpt")
