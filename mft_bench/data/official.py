"""``data.selection: official``: the training rows the official MFT code trains on, validation rows beyond them.

The official ``get_datasets`` (scripts/utils.py, called by finetune.py with its ``dataset_mixer``) loads each
source whole (``load_dataset(name, config, split="train")``, or ``load_dataset("json", ...)`` for a file),
shuffles it with ``datasets``' ``shuffle(seed=42)`` whatever the run's seed, keeps ``select(range(N))`` with no
filtering before the cut, and concatenates the sources in mixer order; no row is held out. Here the training
split is exactly those rows in that order (the trainer's sampler shuffles them, as the official DataLoader
does), and the validation rows are the next ones of the same shuffled order, so none of them is trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mft_bench.data import synthetic_math
from mft_bench.data.sources import SourceSpec, convert_rows, read_table
from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

OFFICIAL_SEED = 42  # get_datasets: dataset.shuffle(seed=42)


def official_positions(total: int) -> list[int]:
    """Row positions of a ``total``-row table in the order ``datasets.Dataset.shuffle(seed=42)`` gives it.

    ``shuffle`` draws ``numpy.random.default_rng(seed).permutation(len(table))``, which depends on the length
    alone, so shuffling an index column of the same length yields the same rows without copying the table.
    """
    import datasets

    index = datasets.Dataset.from_dict({"row": list(range(total))})
    return list(index.shuffle(seed=OFFICIAL_SEED)["row"])


def validation_quotas(rows: Sequence[int], validation_rows: int, beyond: Sequence[int | None]) -> list[int]:
    """``validation_rows`` split over the sources in proportion to their ``rows`` (largest remainders, ties to the
    earlier source), none taking more than the rows it has ``beyond`` its training rows (None: no limit); what a
    short source cannot give goes to the others in the same proportions."""
    quotas = [0] * len(rows)
    open_ = [i for i in range(len(rows)) if beyond[i] is None or beyond[i] > 0]
    left = validation_rows
    while left > 0 and open_:
        total = sum(rows[i] for i in open_)
        exact = {i: left * rows[i] / total for i in open_}
        share = {i: int(exact[i]) for i in open_}
        for i in sorted(open_, key=lambda i: (-(exact[i] - share[i]), i))[: left - sum(share.values())]:
            share[i] += 1
        for i in open_:
            room = None if beyond[i] is None else beyond[i] - quotas[i]
            take = share[i] if room is None else min(share[i], room)
            quotas[i] += take
            left -= take
        open_ = [i for i in open_ if beyond[i] is None or quotas[i] < beyond[i]]
    if left > 0:
        raise MftBenchError(
            f"data.validation_rows {validation_rows}: the sources have only {validation_rows - left} rows beyond "
            f"their training rows; lower validation_rows or the sources' rows"
        )
    return quotas


def official_splits(
    sources: Sequence[SourceSpec], *, seed: int, validation_rows: int, data_dir: str | None = None
) -> dict[str, list[list[dict]]]:
    """``{"train", "validation"}``: each source's official rows (recipe order) and validation rows beyond them.

    A synthetic source has no official order: its generator's own (seeded) order is cut the same way.
    """
    for source in sources:
        if source.rows is None:
            raise MftBenchError(
                f"data source '{source.name}': data.selection official trains on every row when rows is unset, "
                f"leaving none beyond them for validation; set rows (the official dataset_mixer count)"
            )
    tables = [read_table(source, data_dir) for source in sources]
    beyond: list[int | None] = []
    for source, (_, _, table) in zip(sources, tables):
        if table is not None and source.rows > len(table):
            raise MftBenchError(
                f"data source '{source.name}': rows {source.rows} asked but it has only {len(table)}; lower rows"
            )
        beyond.append(None if table is None else len(table) - source.rows)
    quotas = validation_quotas([s.rows for s in sources], validation_rows, beyond)
    train: list[list[dict]] = []
    validation: list[list[dict]] = []
    for source, (kind, path, table), quota in zip(sources, tables, quotas):
        wanted = source.rows + quota
        if table is None:
            rows = synthetic_math.generate(source.split, wanted, seed)  # already seeded and shuffled
            positions, columns = list(range(wanted)), ["question", "answer"]
        else:
            positions = official_positions(len(table))[:wanted]
            rows, columns = table.select(positions).to_list(), table.column_names
        conversations = convert_rows(source, rows, columns, positions)
        train += conversations[: source.rows]
        validation += conversations[source.rows:]
        logger.info("data source %s (%s): the official %d training rows, %d beyond them for validation",
                    source.name, path if kind == "local" else kind, source.rows, quota)
    return {"train": train, "validation": validation}
