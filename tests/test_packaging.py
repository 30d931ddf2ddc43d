"""A plain (non-editable) install carries the recipes and the paper's numbers: the wheel ships ``tasks/`` and
``results/paper/`` inside the package, and the installed package, run from a folder far from any checkout, lists
the recipes and sets the paper's row in the paper-shaped table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fake_run import make_run

from mft_bench.resources import SHIPPED, SHIPPED_FOLDERS

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("mft_bench", "tasks", "results/paper", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a clean copy of the checkout's sources (no stale build folder can leak into it)."""
    source = tmp_path / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheels"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("mft_bench-*.whl")
    return wheel


@pytest.mark.slow  # builds and installs a wheel: ~15-30 s
def test_a_plain_install_ships_recipes_and_paper_numbers(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name: archive.read(name) for name in archive.namelist() if f"mft_bench/{SHIPPED}/" in name}
    expected = {}
    for name, folder in SHIPPED_FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".yaml", ".json", ".md"}:
                expected[f"mft_bench/{SHIPPED}/{name}/{path.relative_to(ROOT / folder).as_posix()}"] = path.read_bytes()
    assert "mft_bench/_shipped/tasks/paper/llama2-7b-math.yaml" in expected  # the layout this test assumes
    assert shipped == expected

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    runs = [make_run(tmp_path / "runs" / "with-paper", paper_key="llama2-7b"),
            make_run(tmp_path / "runs" / "other", checkpoints=False, paper_key=None)]
    far = tmp_path / "elsewhere"
    far.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy only, not the checkout

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "mft_bench.cli", *args], cwd=far, env=env, text=True,
                              capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import mft_bench; print(mft_bench.__file__)"], cwd=far, env=env,
                           text=True, capture_output=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(site)
    assert "paper/llama2-7b-math" in cli("list")
    cli("report", *map(str, runs), "--out", str(far / "table"))
    markdown = (far / "table" / "paper_table.md").read_text()
    assert markdown.count("| paper (test-selected) |") == 1 and "47.3 (+0.4)" in markdown
