"""The offline data directory: hub dataset names mapped to local files.

Set it with the environment variable ``MFT_BENCH_DATA_DIR`` (or a recipe's ``data_dir``). Its layout is the
one of ``../shared/data`` on the development machines::

    gsm8k/train.jsonl, gsm8k/test.jsonl     (openai/gsm8k, config "main")
    ifeval/input_data.jsonl                 (google/IFEval)
    humanevalplus/test.jsonl                (evalplus/humanevalplus, the hub repository's test.jsonl)

When a dataset is found there, the hub is never contacted.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MFT_BENCH_DATA_DIR"

# hub name (lower case) -> split -> path inside the offline directory
OFFLINE_LAYOUT: dict[str, dict[str, str]] = {
    "openai/gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "google/ifeval": {"train": "ifeval/input_data.jsonl", "test": "ifeval/input_data.jsonl"},
    "ifeval": {"train": "ifeval/input_data.jsonl", "test": "ifeval/input_data.jsonl"},
    "evalplus/humanevalplus": {"test": "humanevalplus/test.jsonl"},
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data directory in force: the explicit setting, else ``$MFT_BENCH_DATA_DIR``, else None."""
    value = explicit or os.environ.get(ENV_VAR)
    return Path(value).expanduser().resolve() if value else None


def resolve_offline(name: str, split: str, explicit_dir: str | os.PathLike | None = None) -> Path | None:
    """Local file for ``name``/``split`` in the offline directory, or None when there is none."""
    root = data_dir(explicit_dir)
    relative = OFFLINE_LAYOUT.get(name.lower(), {}).get(split)
    if root is None or relative is None:
        return None
    path = root / relative
    return path if path.is_file() else None
