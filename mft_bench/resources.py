"""Where the shipped recipes (``tasks/``) and paper numbers (``results/paper/``) are read from.

The checkout's top-level ``tasks/`` and ``results/paper/`` are the copies users read and edit. A wheel carries
them inside the package as ``mft_bench/_shipped/{tasks,paper}`` (copied at build time by ``setup.py``), so a
plain ``pip install .`` finds them too; a checkout (or an editable install) has no ``_shipped`` and reads its own.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = "_shipped"  # the folder inside the package a wheel carries the data in
SHIPPED_FOLDERS = {"tasks": Path("tasks"), "paper": Path("results") / "paper"}  # name in the wheel -> checkout path


def _located(name: str) -> Path:
    package = Path(__file__).resolve().parent
    shipped = package / SHIPPED / name
    return shipped if shipped.is_dir() else package.parent / SHIPPED_FOLDERS[name]


def tasks_dir() -> Path:
    """The recipes: ``default.yaml``, ``smoke.yaml``, ``paper/*.yaml``, ``sweeps/*.yaml``, ..."""
    return _located("tasks")


def paper_numbers_dir() -> Path:
    """The paper's numbers, one ``<key>.json`` per backbone (format: its README.md)."""
    return _located("paper")
