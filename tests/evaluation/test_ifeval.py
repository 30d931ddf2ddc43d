"""IFEval: lm-eval's checkers on hand-written responses, strict vs loose, aggregation, NLTK handling."""

from __future__ import annotations

import json
import sys

import pytest

from mft_bench.errors import MftBenchError
from mft_bench.evaluation import ifeval
from mft_bench.evaluation.base import GenerationRequest, Item
from mft_bench.evaluation.gsm8k import mean_stderr

LOWERCASE = {"prompt": "Answer in lowercase.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}


def _row(instruction_id: str, prompt: str = "Do it.", **kwargs) -> dict:
    return {"key": 1, "prompt": prompt, "instruction_id_list": [instruction_id], "kwargs": [kwargs]}


def _strict_loose(row: dict, response: str) -> tuple[float, float]:
    verdict = ifeval.check_response(row, response)
    return verdict["prompt_level_strict_acc"], verdict["prompt_level_loose_acc"]


def test_lowercase_followed_and_not() -> None:
    good = "the quick brown fox jumps over the lazy dog, and then it goes back home to sleep for the night."
    bad = "The Quick Brown Fox jumps over the lazy dog, and then it goes back home to sleep for the night."
    assert _strict_loose(LOWERCASE, good) == (1.0, 1.0)
    assert _strict_loose(LOWERCASE, bad) == (0.0, 0.0)


def test_loose_forgives_a_preamble_line_and_markdown_stars() -> None:
    body = "the quick brown fox jumps over the lazy dog, and then it goes back home to sleep for the night."
    assert _strict_loose(LOWERCASE, "Sure! Here it is:\n" + body) == (0.0, 1.0)
    end = _row("startend:end_checker", end_phrase="Is there anything else I can help with?")
    assert _strict_loose(end, "Done. Is there anything else I can help with?") == (1.0, 1.0)
    assert _strict_loose(end, "Done. **Is there anything else I can help with?**") == (0.0, 1.0)
    assert _strict_loose(end, "Is there anything else I can help with? Bye.") == (0.0, 0.0)


def test_json_format() -> None:
    row = _row("detectable_format:json_format")
    assert _strict_loose(row, '{"name": "mft", "layers": [4, 5, 6, 7]}') == (1.0, 1.0)
    assert _strict_loose(row, '```json\n{"name": "mft"}\n```') == (1.0, 1.0)
    assert _strict_loose(row, "name: mft") == (0.0, 0.0)


def test_number_of_paragraphs_and_no_comma() -> None:
    row = _row("length_constraints:number_paragraphs", num_paragraphs=3)
    assert _strict_loose(row, "First part.\n***\nSecond part.\n***\nThird part.") == (1.0, 1.0)
    assert _strict_loose(row, "First part.\n***\nSecond part.") == (0.0, 0.0)
    no_comma = _row("punctuation:no_comma")
    assert _strict_loose(no_comma, "No commas here at all.") == (1.0, 1.0)
    assert _strict_loose(no_comma, "One, two.") == (0.0, 0.0)


def test_empty_response_follows_nothing() -> None:
    assert _strict_loose(_row("punctuation:no_comma"), "   ") == (0.0, 0.0)


def test_score_and_aggregate_prompt_and_instruction_level() -> None:
    bench = ifeval.IFEval()
    two = {"key": 7, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "detectable_format:json_format"],
           "kwargs": [{}, {}]}
    item = Item(id="ifeval/7", request=GenerationRequest(prompt="p"), data=two)
    all_ok = bench.score(item, ['{"a": 1}'])
    half = bench.score(item, ['{"a": 1, "b": 2}'])  # valid JSON, but it has a comma
    assert all_ok["scores"] == {"prompt_level_strict_acc": 1.0, "prompt_level_loose_acc": 1.0}
    assert half["scores"] == {"prompt_level_strict_acc": 0.0, "prompt_level_loose_acc": 0.0}
    assert half["follow_instruction_list_strict"] == [False, True]
    json.dumps(half)  # records must be JSON-serialisable

    metrics = bench.aggregate([all_ok, half])
    assert set(metrics) == {"prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                            "inst_level_loose_acc"}
    assert metrics["prompt_level_strict_acc"]["mean"] == pytest.approx(0.5)
    assert metrics["inst_level_strict_acc"]["mean"] == pytest.approx(3 / 4)
    assert metrics["inst_level_loose_acc"]["stderr"] > 0
    assert bench.primary_metric == "inst_level_loose_acc"


def test_ratio_stderr_matches_binomial_when_one_instruction_per_prompt() -> None:
    successes = [1.0, 0.0, 1.0, 1.0]
    result = ifeval.ratio_stderr(successes, [1.0] * 4)
    # with clusters of size 1 this is the usual sample stderr of the mean
    assert result["mean"] == pytest.approx(0.75)
    assert result["stderr"] == pytest.approx(mean_stderr(successes)["stderr"])
    assert result["stderr"] == pytest.approx(0.25)  # sqrt(var_ddof1 / n) = sqrt(0.25 / 4)


@pytest.fixture
def fake_punkt(tmp_path, monkeypatch):
    """A minimal punkt_tab (empty parameters: split at every . ! ?) on the NLTK path, caches cleared after."""
    import nltk

    english = tmp_path / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (english / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    utils = ifeval.load_checkers()
    yield
    # the fake tokenizer must not outlive the test in lm-eval's and NLTK's caches
    sys.modules[utils.__name__.rsplit(".", 1)[0] + ".instructions_util"]._get_sentence_tokenizer.cache_clear()
    if hasattr(nltk.tokenize, "_get_punkt_tokenizer"):
        nltk.tokenize._get_punkt_tokenizer.cache_clear()


def test_sentence_count_with_punkt_tab(fake_punkt) -> None:
    row = _row("length_constraints:number_sentences", relation="less than", num_sentences=3)
    assert _strict_loose(row, "One sentence. Two sentences.") == (1.0, 1.0)
    assert _strict_loose(row, "One. Two. Three. Four.") == (0.0, 0.0)
    ifeval.ensure_nltk_data(row["instruction_id_list"])  # present: no error


def test_missing_punkt_tab_names_the_fix(tmp_path, monkeypatch) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(MftBenchError, match=r"python -m nltk\.downloader punkt_tab"):
        ifeval.ensure_nltk_data(["punctuation:no_comma", "change_case:capital_word_frequency"])
    ifeval.ensure_nltk_data(["punctuation:no_comma"])  # does not need it

    data = tmp_path / "data" / "ifeval"
    data.mkdir(parents=True)
    rows = [_row("punctuation:no_comma"), {**_row("length_constraints:number_sentences", relation="less than",
                                                  num_sentences=2), "key": 2}]
    (data / "input_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = ifeval.IFEval(data_dir=str(tmp_path / "data"))
    assert [i.id for i in bench.items(limit=1)] == ["ifeval/1"]  # the first prompt needs no NLTK data
    with pytest.raises(MftBenchError, match="punkt_tab"):
        bench.items()  # fails before any generation


def test_import_never_downloads_or_prints(monkeypatch, capsys) -> None:
    import nltk

    calls = []
    monkeypatch.setattr(nltk, "download", lambda *a, **k: calls.append(a) or True)
    for name in [m for m in sys.modules if m.startswith("lm_eval.tasks.ifeval")]:
        monkeypatch.delitem(sys.modules, name)  # force the import-time download check to run again
    ifeval.load_checkers()
    assert calls == []
    assert capsys.readouterr().out == ""
    assert nltk.download is not None and nltk.download.__name__ == "<lambda>"  # restored


def test_real_prompts(shared_data) -> None:
    bench = ifeval.IFEval(data_dir=str(shared_data))
    items = bench.items(limit=5)
    assert [i.id for i in items][:1] == ["ifeval/1000"]
    request = items[0].request
    assert request.chat is False and request.max_new_tokens == 1280 and request.stop == ()
    assert len(bench.data_hash()) == 16
    if not ifeval.nltk_data_available():
        with pytest.raises(MftBenchError, match="punkt_tab"):
            bench.items()
    else:
        assert len(bench.items()) == 541


SCORE_IN_A_FRESH_PROCESS = """
import json, sys
from mft_bench.evaluation import ifeval
pairs = json.load(sys.stdin)
print(json.dumps([ifeval.check_response(row, response)["follow_instruction_list_strict"] for row, response in pairs]))
"""


def _letter_frequency_pairs() -> list:
    """Rows shaped like IFEval keys 1122 and 1129 (their "letters" ``#`` and ``!`` make the checker draw a random
    letter) and responses holding half of the 26 letters often enough: a random letter passes half of them."""
    import random
    import string

    ids = ["keywords:letter_frequency"]
    rows = [{"key": 1122, "prompt": "Tweet with at least 4 hashtags.", "instruction_id_list": ids,
             "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}]},
            {"key": 1129, "prompt": "Pitch with 6 or more '!'.", "instruction_id_list": ids,
             "kwargs": [{"let_relation": "at least", "letter": "!", "let_frequency": 6}]}]
    pick = random.Random(0)
    responses = [" ".join(letter * 6 for letter in pick.sample(string.ascii_lowercase, 13)) for _ in range(16)]
    return [[row, response] for row in rows for response in responses]


@pytest.mark.slow  # measured among the slowest of the default suite (--durations)
def test_random_argument_checkers_give_the_same_verdicts_in_any_process() -> None:
    import os
    import random
    import subprocess
    from pathlib import Path

    pairs = _letter_frequency_pairs()
    root = Path(__file__).resolve().parents[2]
    runs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS], input=json.dumps(pairs), env=env,
                              capture_output=True, text=True, timeout=300, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]
    verdicts = [v[0] for v in runs[0]]
    assert 0 < sum(verdicts) < len(verdicts)  # the verdict depends on the drawn letter, as the responses intend

    random.seed(12345)  # the caller's random state neither changes the verdicts nor is changed by scoring
    before = random.getstate()
    assert [ifeval.check_response(row, response)["follow_instruction_list_strict"] for row, response in pairs] \
        == runs[0]
    assert random.getstate() == before
    # one item's verdict does not depend on what was scored before it
    assert [ifeval.check_response(row, response)["follow_instruction_list_strict"]
            for row, response in reversed(pairs)] == list(reversed(runs[0]))
