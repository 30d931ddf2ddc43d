"""Build hook: a wheel carries the recipes (``tasks/``) and paper numbers (``results/paper/``) inside the package.

The top-level folders stay the user-facing copies; they are copied into ``mft_bench/_shipped/`` at build time
(``mft_bench.resources`` reads them from there in an installed package). Everything else is in pyproject.toml.
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# the layout is mft_bench.resources' (loaded by path: the package's dependencies need not be installed to build)
_spec = importlib.util.spec_from_file_location("_mft_bench_resources", ROOT / "mft_bench" / "resources.py")
resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resources)
SUFFIXES = {".yaml", ".json", ".md"}


class BuildWithShippedData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the checkout's folders directly
            return
        for name, relative in resources.SHIPPED_FOLDERS.items():
            source = ROOT / relative
            if not source.is_dir():
                raise SystemExit(f"setup.py: {source} is missing; the wheel would ship without it")
            target = Path(self.build_lib) / "mft_bench" / resources.SHIPPED / name
            for path in sorted(source.rglob("*")):
                if path.is_file() and path.suffix in SUFFIXES:
                    destination = target / path.relative_to(source)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, destination)


setup(cmdclass={"build_py": BuildWithShippedData})
