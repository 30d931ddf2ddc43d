"""Reports of runs: per-recipe tables with intervals and paired tests, plots, the paper-shaped table
across recipes, and the regression check against ``results/reference/``.

Modules: ``stats`` (intervals, paired tests), ``collect`` (reading run folders, atomic writes),
``build`` (report.json), ``tables`` (Markdown/CSV/LaTeX), ``paper_numbers`` (the paper's numbers, a leaf),
``paper_table`` (the cross-recipe table, the top), ``plots`` (figures), ``check`` (references).
"""

from mft_bench.report.build import build_report, write_report
from mft_bench.report.check import check_against_reference, write_reference
from mft_bench.report.paper_table import write_paper_table

__all__ = ["build_report", "check_against_reference", "write_paper_table", "write_reference", "write_report"]
