"""Mix sources into one training pool and carve a validation split off it (never off a test split)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from mft_bench.data.official import official_splits
from mft_bench.data.sources import SourceSpec, load_conversations
from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)


def is_test_split(split: str) -> bool:
    """True for ``test`` and hub slices of it (``test[:100]``): benchmark data, never used for training."""
    return split.split("[", 1)[0].strip().lower() == "test"


SELECTIONS = ("seeded", "official")


def build_splits(
    sources: Sequence[SourceSpec], *, seed: int, validation_rows: int, data_dir: str | None = None,
    selection: str = "seeded",
) -> dict[str, list[list[dict]]]:
    """``{"train", "validation"}`` conversations from the sources' mixture.

    ``seeded``: each source is shuffled with ``seed`` and cut to its ``rows``; the sources are concatenated,
    shuffled again (seeded), and the last ``validation_rows`` conversations of that pool become the validation
    split. ``official``: exactly the official code's training rows, validation rows from beyond them
    (``mft_bench.data.official``).
    """
    if selection not in SELECTIONS:
        raise MftBenchError(f"data.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if not sources:
        raise MftBenchError("data.sources is empty; name at least one training source")
    if validation_rows < 0:
        raise MftBenchError(f"validation_rows must be >= 0, got {validation_rows}")
    for source in sources:
        if is_test_split(source.split):
            raise MftBenchError(
                f"data source '{source.name}': split '{source.split}' is a test split; training and validation "
                f"data must come from a non-test split (e.g. split: train)"
            )
    if selection == "official":
        return official_splits(sources, seed=seed, validation_rows=validation_rows, data_dir=data_dir)
    pool: list[list[dict]] = []
    for source in sources:
        pool.extend(load_conversations(source, seed=seed, data_dir=data_dir))
    if validation_rows >= len(pool):
        raise MftBenchError(
            f"validation_rows ({validation_rows}) must be smaller than the training pool ({len(pool)} rows); "
            f"lower validation_rows or add rows"
        )
    # A seed distinct from the per-source shuffles, so the mix is not the same permutation again.
    random.Random(f"mixture/{seed}").shuffle(pool)
    cut = len(pool) - validation_rows
    logger.info("mixture: %d train, %d validation conversations from %d sources", cut, validation_rows, len(sources))
    return {"train": pool[:cut], "validation": pool[cut:]}
