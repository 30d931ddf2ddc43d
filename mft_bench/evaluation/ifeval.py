"""IFEval: the 541 verifiable-instruction prompts, scored with lm-eval's port of Google's checkers.

Protocol: zero-shot, the prompt as raw text (no chat template, as the issue fixes for the paper's protocol;
OLMES's chat suites such as ``ifeval::tulu`` apply one), greedy, at most 1280 new tokens, no stop sequence
(OLMES and lm-eval ``ifeval``: ``max_gen_toks: 1280``, ``until: []``).

Scoring reuses ``lm_eval.tasks.ifeval.utils.test_instruction_following_strict`` / ``_loose`` unchanged. Metrics, as
in lm-eval and the official README:

- ``prompt_level_strict_acc`` / ``prompt_level_loose_acc``: share of prompts whose every instruction is followed;
- ``inst_level_strict_acc`` / ``inst_level_loose_acc``: share of all instructions followed (micro-average);
- headline (``primary_metric``): ``inst_level_loose_acc``, the official README's headline number.

Per-item records carry the prompt-level scores (one 0/1 per prompt, for paired tests) and the per-instruction
booleans as extras; the instruction-level stderr is the cluster (ratio-estimator) stderr over prompts, since
instructions of one prompt are not independent.

NLTK: lm-eval's ``instructions_util`` calls ``nltk.download("punkt_tab")`` at import when the data is missing;
that is suppressed here (no network, no spam). ``punkt_tab`` is then needed only by the instructions in
``NLTK_INSTRUCTIONS``; when items that use them are requested and it is missing, a ``MftBenchError`` names the fix.
``langdetect`` is seeded (``DetectorFactory.seed = 0``) so language checks are deterministic.

Deterministic verdicts: a checker whose kwargs are missing or invalid draws them from Python's global ``random``
when it is built. In the 541 prompts that happens for ``keywords:letter_frequency`` in keys 1122 and 1129 (their
"letters" are ``#`` and ``!``, which the checker rejects; it then counts a random ASCII letter instead), so,
unseeded, their verdicts depend on the process, not on the response. ``check_response`` builds every item's checkers
under ``random.seed("ifeval/<key>")`` and restores the caller's random state afterwards: the same response gets
the same verdicts in any process, in any order, under any ``limit``. lm-eval does not seed per item: it seeds
``random`` once per ``simple_evaluate`` call (``random_seed``, default 0), so its draw for such an item depends
on every draw before it in that run (the task, ``limit`` and document order). Those two verdicts (of 834
instructions) can therefore differ from a plain lm-eval run's; they measure no instruction following either way.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from mft_bench.errors import MftBenchError
from mft_bench.evaluation.base import BenchmarkFacts, GenerationRequest, Item
from mft_bench.evaluation.common import load_rows, mean_stderr

logger = logging.getLogger(__name__)

HUB_NAME = "google/IFEval"

# Instructions whose checkers tokenize sentences with NLTK's punkt_tab (count_sentences, nltk.word_tokenize).
NLTK_INSTRUCTIONS = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})

NLTK_FIX = (
    "IFEval needs NLTK's 'punkt_tab' data for the instructions {ids}: install it with "
    "`python -m nltk.downloader punkt_tab` (or set NLTK_DATA to a folder containing tokenizers/punkt_tab)"
)

PROMPT_METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc")
INST_METRICS = {"inst_level_strict_acc": "follow_instruction_list_strict",
                "inst_level_loose_acc": "follow_instruction_list_loose"}


@contextlib.contextmanager
def suppress_nltk_download() -> Iterator[None]:
    """Within the block, ``nltk.download`` is a no-op and stdout is swallowed (lm-eval prints after downloading).

    lm-eval's ``instructions_util`` downloads ``punkt_tab`` at import time when it is missing: offline that is a
    network wait and a traceback on stderr for nothing. The real function is restored afterwards.
    """
    import nltk

    real_download = nltk.download

    def _no_download(*args: Any, **kwargs: Any) -> bool:
        logger.debug("suppressed nltk.download%s", args)
        return False

    nltk.download = _no_download
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nltk.download = real_download


def load_checkers() -> ModuleType:
    """Import ``lm_eval.tasks.ifeval.utils`` without letting it download NLTK data or print."""
    state = random.getstate()  # a first import draws from the global random (lm-eval's, nltk's, ...): undone
    import langdetect

    with suppress_nltk_download():
        from lm_eval.tasks.ifeval import utils
    random.setstate(state)
    # langdetect is randomised unless seeded; a fixed seed makes the language checks reproducible.
    langdetect.DetectorFactory.seed = 0
    return utils


def nltk_data_available() -> bool:
    """Whether NLTK's ``punkt_tab`` can be found on the current NLTK data path."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def ensure_nltk_data(instruction_ids: Iterable[str]) -> None:
    """Raise ``MftBenchError`` naming the fix when any of ``instruction_ids`` needs ``punkt_tab`` and it is missing."""
    needed = sorted(NLTK_INSTRUCTIONS.intersection(instruction_ids))
    if needed and not nltk_data_available():
        raise MftBenchError(NLTK_FIX.format(ids=", ".join(needed)))


@contextlib.contextmanager
def seeded_random(seed: str) -> Iterator[None]:
    """Within the block the global ``random`` is seeded with ``seed`` (a string: hashed with SHA-512 by
    ``random.seed``, the same in every process); the caller's state is restored afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def check_response(row: dict[str, Any], response: str) -> dict[str, Any]:
    """Strict and loose verdicts of one response to one IFEval row (``prompt``, ``instruction_id_list``, ``kwargs``).

    Checkers that draw missing arguments at random draw them from ``random.seed("ifeval/<key>")``, for strict
    and loose alike (see the module docstring).
    """
    utils = load_checkers()
    key = row.get("key", 0)
    example = utils.InputExample(
        key=key,
        instruction_id_list=list(row["instruction_id_list"]),
        prompt=row["prompt"],
        kwargs=list(row["kwargs"]),
    )
    try:
        with seeded_random(f"ifeval/{key}"):
            strict = utils.test_instruction_following_strict(example, response)
        with seeded_random(f"ifeval/{key}"):
            loose = utils.test_instruction_following_loose(example, response)
    except LookupError as exc:  # an NLTK resource missing despite the pre-check (e.g. another tokenizer model)
        raise MftBenchError(NLTK_FIX.format(ids=", ".join(row["instruction_id_list"])) + f" ({exc!s:.80})") from exc
    return {
        "prompt_level_strict_acc": float(strict.follow_all_instructions),
        "prompt_level_loose_acc": float(loose.follow_all_instructions),
        "follow_instruction_list_strict": [bool(x) for x in strict.follow_instruction_list],
        "follow_instruction_list_loose": [bool(x) for x in loose.follow_instruction_list],
    }


def ratio_stderr(successes: list[float], sizes: list[float]) -> dict[str, float]:
    """Micro-average ``sum(successes) / sum(sizes)`` and its cluster (ratio-estimator) standard error."""
    n, total = len(sizes), sum(sizes)
    if n == 0 or total == 0:
        return {"mean": float("nan"), "stderr": float("nan")}
    ratio = sum(successes) / total
    if n == 1:
        return {"mean": ratio, "stderr": 0.0}
    mean_size = total / n
    residual_var = sum((y - ratio * m) ** 2 for y, m in zip(successes, sizes)) / (n - 1)
    return {"mean": ratio, "stderr": math.sqrt(residual_var / n) / mean_size}


FACTS = {"ifeval": BenchmarkFacts(items=541, prompt_tokens=60, new_tokens=400, domain="instruction", headline=True)}


class IFEval:
    """The 541 IFEval prompts, zero-shot raw text, strict and loose instruction checks."""

    name = "ifeval"
    prompt_version = "1"
    scorer_version = "2"
    prompt_options = ()
    primary_metric = "inst_level_loose_acc"

    def __init__(self, max_new_tokens: int = 1280, data_dir: str | None = None) -> None:
        self.max_new_tokens = max_new_tokens
        self.data_dir = data_dir
        self._rows: list[dict[str, Any]] | None = None
        self._data_hash: str | None = None

    def _load(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows, self._data_hash = load_rows(HUB_NAME, "train", self.data_dir, _load_from_hub)
        return self._rows

    def items(self, limit: int | None = None) -> list[Item]:
        rows = self._load()
        selected = rows if limit is None else rows[:limit]
        # Fail before any generation when the scorer will need NLTK data that is not installed.
        ensure_nltk_data(iid for row in selected for iid in row["instruction_id_list"])
        return [
            Item(
                id=f"ifeval/{row['key']}",
                request=GenerationRequest(
                    prompt=row["prompt"], chat=False, max_new_tokens=self.max_new_tokens, temperature=0.0
                ),
                data={"key": row["key"], "prompt": row["prompt"],
                      "instruction_id_list": list(row["instruction_id_list"]), "kwargs": list(row["kwargs"])},
            )
            for row in selected
        ]

    def data_hash(self) -> str:
        self._load()
        assert self._data_hash is not None
        return self._data_hash

    def score(self, item: Item, outputs: list[str]) -> dict[str, Any]:
        verdicts = check_response(item.data, outputs[0] if outputs else "")
        return {
            "extracted": None,
            "scores": {m: verdicts[m] for m in PROMPT_METRICS},
            "instruction_id_list": item.data["instruction_id_list"],
            "follow_instruction_list_strict": verdicts["follow_instruction_list_strict"],
            "follow_instruction_list_loose": verdicts["follow_instruction_list_loose"],
        }

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
        result = {m: mean_stderr([float(r["scores"][m]) for r in records]) for m in PROMPT_METRICS}
        for metric, field in INST_METRICS.items():
            result[metric] = ratio_stderr(
                [float(sum(r[field])) for r in records], [float(len(r[field])) for r in records]
            )
        return result


def _load_from_hub() -> list[dict[str, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(HUB_NAME, split="train")
    except Exception as exc:  # datasets raises many types offline
        raise MftBenchError(
            "IFEval prompts not found: set MFT_BENCH_DATA_DIR to a folder with ifeval/input_data.jsonl or allow hub "
            f"access ({type(exc).__name__})"
        ) from exc
    return [dict(row) for row in dataset]
