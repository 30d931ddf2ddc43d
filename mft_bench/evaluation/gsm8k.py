"""GSM8K: 8-shot chain-of-thought, greedy, exact match on the final number.

Protocol (the paper evaluated through AI2 OLMES, ``gsm8k::olmes``, on top of lm-eval 0.4.3):

- exemplars: OLMES ``FEWSHOT_SOURCES["STD:GSM8k"]`` (allenai/olmes, ``oe_eval/tasks/fewshot_sources.py``), i.e.
  the 8 chain-of-thought exemplars of Wei et al. (2022) -- the same questions and reasoning as lm-eval's
  ``gsm8k_cot`` -- each ending "So the answer is N.";
- format: ``"Question: {q}\\nAnswer: {cot}"`` blocks joined by a blank line, then ``"Question: {q}\\nAnswer:"``
  (OLMES ``gsm8k`` ``doc_to_text``), raw text, no chat template (the issue fixes "no chat template"; newer
  OLMES suites set ``use_chat_format`` for ``gsm8k::olmes``, the base-model protocol does not);
- generation: greedy, at most 512 new tokens, stop at ``"Question:"``, ``"</s>"``, ``"<|im_end|>"``, ``"\\n\\n"``
  (OLMES ``gsm8k`` ``generation_kwargs``);
- scoring, two extractions, both reported. Neither is lm-eval's metric of the similar name; compare them only
  with what is stated here (``tests/evaluation/test_gsm8k.py`` runs lm-eval's own filters on the same tricky strings):

  * ``exact_match_flexible`` (primary): the last number in the output equals the gold. This is the paper's
    metric, OLMES's ``exact_match`` for ``gsm8k`` (``GSM8K._extract_answer``: join digit,digit commas, take the
    last number; then exact match ignoring ``,``, ``$``, a final ``.``), with three deliberate deviations:
    signs -- OLMES's number pattern signs decimals only, so ``-5`` reads 5 for it (and its gold too); here a minus
    is kept unless it is a binary operator (``"to -5"`` -> -5, ``"5-3"`` -> 5 and 3); commas -- OLMES joins any
    digit,digit pair (``"1,23"`` -> 123), here only thousands groups (``"1,234"`` -> 1234, ``"1,23"`` -> 1 and
    23); numeric equality -- ``"12.0"`` matches gold 12 here, not in OLMES (strings). GSM8K golds are
    non-negative integers, so the deviations rarely move a score. Not lm-eval's ``flexible-extract`` either
    (last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)``: ``"50-8"`` reads -8 there; ``"42.0"`` does not match 42);
  * ``exact_match_strict``: the number after the *last* "the answer is" (any case, any spacing, an optional
    ``:`` and ``$``) equals the gold: did the model keep the exemplars' answer format. OLMES reports no strict
    metric, and this is NOT lm-eval's ``strict-match``: ``gsm8k_cot`` takes the *first* match of
    ``The answer is (\\-?[0-9\\.\\,]+).`` (capital T, one space, one character must follow the number, so a
    final ``"The answer is 42"`` reads 4), ``gsm8k`` the first ``#### N``.

Normalisation (deliberate, tested): commas in thousands groups, ``$`` and a sentence-final ``.`` are dropped and
the number is written in canonical decimal form, so ``"$1,234.50."`` -> ``"1234.5"`` and ``"12.0"`` -> ``"12"``.
"""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import BenchmarkFacts, GenerationRequest, Item
from mft_bench.evaluation.common import aggregate_scores, load_rows, mean_stderr, short_hash  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"

# OLMES FEWSHOT_SOURCES["STD:GSM8k"] (Wei et al. 2022 chain-of-thought exemplars), in their order.
FEWSHOT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. So the answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. So the answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
        "So the answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. So the answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. So the answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. So the answer is 8.",
    ),
)

STOP_SEQUENCES: tuple[str, ...] = ("Question:", "</s>", "<|im_end|>", "\n\n")

# A number: optional sign (only when not preceded by a word character or ")" -- "5-3" is subtraction), then
# either thousands groups "1,234,567" or plain digits, optional decimals; or a bare ".5".
_NUMBER = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(r"the answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")

EXTRACTION_MODES = ("flexible", "strict", "hash")


def normalize_number(text: str) -> str | None:
    """Canonical decimal spelling of one number: no commas, no ``$``, no trailing ``.``, no trailing zeros."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    """The final numeric answer of a completion, normalised (see module docstring), or None.

    ``flexible``: the last number anywhere; ``strict``: the number after the last "the answer is";
    ``hash``: the number after the last ``####`` (the GSM8K solution format, used by in-domain test splits).
    """
    if mode == "flexible":
        matches = _NUMBER_RE.findall(text)
    elif mode == "strict":
        matches = _STRICT_RE.findall(text)
    elif mode == "hash":
        matches = _HASH_RE.findall(text)
    else:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of {EXTRACTION_MODES}")
    return normalize_number(matches[-1]) if matches else None


def gold_answer(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field: the number after ``####``, normalised."""
    if "####" not in answer_field:
        raise MftBenchError(f"GSM8K answer field has no '####' final answer: {answer_field[-80:]!r}")
    gold = normalize_number(answer_field.split("####")[-1])
    if gold is None:
        raise MftBenchError(f"GSM8K answer after '####' is not a number: {answer_field.split('####')[-1]!r}")
    return gold


def build_prompt(question: str, num_fewshot: int = 8) -> str:
    """The OLMES GSM8K prompt: ``num_fewshot`` exemplars, then the question, ending in ``"Answer:"``."""
    blocks = [f"Question: {q}\nAnswer: {a}" for q, a in FEWSHOT_EXEMPLARS[:num_fewshot]]
    blocks.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(blocks)


def exact_match_scores(output: str, gold: str, strict_mode: str = "strict") -> dict[str, Any]:
    """Flexible and strict extraction of one output and their 0/1 exact-match scores against ``gold``."""
    flexible = extract_answer(output, "flexible")
    strict = extract_answer(output, strict_mode)
    return {
        "extracted": flexible,
        "extracted_strict": strict,
        "gold": gold,
        "scores": {
            "exact_match_strict": float(strict is not None and strict == gold),
            "exact_match_flexible": float(flexible is not None and flexible == gold),
        },
    }


# 8-shot CoT prompt (the exemplars are shared by every item); answers stop at "Question:"
FACTS = {"gsm8k": BenchmarkFacts(items=1319, prompt_tokens=900, new_tokens=150, shared_prompt_tokens=740,
                                 fewshot=len(FEWSHOT_EXEMPLARS), domain="math", headline=True)}


class GSM8K:
    """GSM8K test set (1,319 problems) under the OLMES 8-shot CoT protocol."""

    name = "gsm8k"
    prompt_version = "1"
    scorer_version = "1"
    prompt_options = ("num_fewshot",)
    primary_metric = "exact_match_flexible"
    metrics = ("exact_match_strict", "exact_match_flexible")
    metric_notes = {
        "exact_match_flexible": "last number = gold: OLMES's gsm8k exact_match (the paper's metric) up to signs, "
                                "commas and numeric equality; not lm-eval's flexible-extract",
        "exact_match_strict": "number after the last 'the answer is' (any case) = gold; not lm-eval's strict-match "
                              "(first 'The answer is N.', exact case)",
    }

    def __init__(self, num_fewshot: int = 8, max_new_tokens: int = 512, data_dir: str | None = None) -> None:
        if not 0 <= num_fewshot <= len(FEWSHOT_EXEMPLARS):
            raise MftBenchError(f"gsm8k num_fewshot must be between 0 and {len(FEWSHOT_EXEMPLARS)}, got {num_fewshot}")
        self.num_fewshot = num_fewshot
        self.max_new_tokens = max_new_tokens
        self.data_dir = data_dir
        self._rows: list[dict[str, Any]] | None = None
        self._data_hash: str | None = None

    def _load(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows, self._data_hash = load_rows(HUB_NAME, "test", self.data_dir, _load_from_hub)
        return self._rows

    def items(self, limit: int | None = None) -> list[Item]:
        rows = self._load()
        selected = rows if limit is None else rows[:limit]
        return [
            Item(
                id=f"gsm8k/{index}",
                request=GenerationRequest(
                    prompt=build_prompt(row["question"], self.num_fewshot),
                    chat=False,
                    max_new_tokens=self.max_new_tokens,
                    stop=STOP_SEQUENCES,
                    temperature=0.0,
                ),
                data={"question": row["question"], "gold": gold_answer(row["answer"])},
            )
            for index, row in enumerate(selected)
        ]

    def data_hash(self) -> str:
        self._load()
        assert self._data_hash is not None
        return self._data_hash

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        return exact_match_scores(outputs[0] if outputs else "", item.data["gold"])

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        return aggregate_scores(records, self.metrics)


def _load_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(HUB_NAME, HUB_CONFIG, split="test")
    except Exception as exc:  # datasets raises many types offline (ConnectionError, OSError, its own)
        raise MftBenchError(
            "GSM8K test set not found: set MFT_BENCH_DATA_DIR to a folder with gsm8k/test.jsonl or allow hub access "
            f"({type(exc).__name__})"
        ) from exc
    return [{"question": row["question"], "answer": row["answer"]} for row in dataset]
