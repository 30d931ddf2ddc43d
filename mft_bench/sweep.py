"""Sweeps: one-factor-at-a-time ablations around a base recipe, run into one folder whose stages they share.

A sweep file (``tasks/sweeps/*.yaml``, ``tasks/paper/ablations/*.yaml``)::

    name: llama2-7b-math            # the sweep's name (default folder: runs/sweeps/<name>)
    description: ...
    sweep:
      base: ../llama2-7b-math.yaml  # the base recipe, relative to this file; without it the rest of this
                                    # file (name, data, mask, ...) is the base recipe itself
      set: {arms: [baseline, fft, mft, random_mask]}   # dotted keys set in every variant, the base included
      axes:                         # dotted recipe key -> values; each value is one variant that differs from
        mask.mask_ratio: [0.05, 0.1, 0.2]   # the base in that key alone (a value equal to the base's is the base)
        mft.learning_rate: [1.0e-5, 5.0e-5]

Variants: ``base``, then per axis every value other than the base's, each run by ``run.run_recipe`` into
``SWEEP/variants/<variant>/`` with its stage folders in ``SWEEP/stages/``: stages are content-addressed, so what
the variants have in common (data, FFT, the pretrained and FFT evaluations, and mask baselines the varied key does
not touch) runs once. The cross-run table (``report.sweep_table``) goes to ``SWEEP/sweep.{md,csv,json,tex}``.
Everything in the file, every axis value included, is validated before anything runs.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mft_bench.errors import MftBenchError
from mft_bench.recipe import Recipe, apply_overrides, validate_recipe

logger = logging.getLogger(__name__)

SWEEP_KEYS = ("base", "set", "axes")
BASE_VARIANT = "base"
SWEEP_RECORD = "sweep.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Variant:
    name: str  # folder under SWEEP/variants: "base" or "<axis>-<value>"
    axis: str | None  # the dotted key it varies (None: the base)
    value: Any  # that key's value in this variant, as validated (the base: None)
    recipe: Recipe


@dataclass
class Sweep:
    name: str
    description: str
    source: Path
    base: Recipe
    axes: dict[str, list[Any]]  # validated values per axis, the base's included
    base_values: dict[str, Any]  # each axis key's value in the base
    variants: list[Variant] = field(default_factory=list)


def is_sweep_file(data: Any) -> bool:
    return isinstance(data, dict) and "sweep" in data


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MftBenchError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise MftBenchError(f"{path}: malformed YAML{where}: {problem}") from None


def _lookup(data: Any, path: list[str]) -> tuple[bool, Any]:
    """(found, value) of a dotted path in a recipe mapping (list items by index)."""
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _assign(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a dotted path that exists in ``data`` (a complete recipe dump)."""
    node: Any = data
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(path[-1])] = copy.deepcopy(value)
    else:
        node[path[-1]] = copy.deepcopy(value)


def value_slug(value: Any) -> str:
    """A value as a folder-name fragment: ``[4, 5, 6, 7]`` -> ``4_5_6_7``, ``2e-05``, ``global-abs-exact``."""
    if isinstance(value, (list, tuple)):
        text = "_".join(value_slug(v) for v in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text) or "empty"


def _without_name(recipe: Recipe) -> dict[str, Any]:
    dump = recipe.model_dump(mode="json")
    dump.pop("name")
    dump.pop("output_dir")
    return dump


def _base_data(path: Path, data: dict[str, Any], block: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The base recipe's raw mapping and what to call it in messages."""
    if "base" not in block:
        inline = {k: v for k, v in data.items() if k != "sweep"}
        return inline, f"{path} (its base recipe with sweep.set)"
    extra = sorted(set(data) - {"name", "description", "sweep"})
    if extra:
        raise MftBenchError(f"{path}: with sweep.base, recipe keys belong in sweep.set, not at the top level: "
                            f"{', '.join(extra)}")
    base = block["base"]
    if not isinstance(base, str) or not base.strip():
        raise MftBenchError(f"{path}: sweep.base must be a recipe path relative to this file, got {base!r}")
    base_path = (path.parent / base).resolve()
    raw = _read_yaml(base_path, f"{path}: sweep.base recipe")
    if not isinstance(raw, dict) or is_sweep_file(raw):
        raise MftBenchError(f"{path}: sweep.base {base} is not a recipe file")
    return raw, f"{path} (its base {base} with sweep.set)"


def _set_block(path: Path, block: dict[str, Any]) -> list[tuple[list[str], Any]]:
    settings = block.get("set") or {}
    if not isinstance(settings, dict):
        raise MftBenchError(f"{path}: sweep.set must map dotted recipe keys to values (e.g. mft.epochs: 1)")
    return [(str(key).split("."), value) for key, value in settings.items()]


def load_sweep(path: str | Path, overrides: list[str] | None = None, only_axes: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file: the base recipe (with ``set`` and ``overrides`` applied, in that order),
    every axis key and every variant recipe. Any problem is one ``MftBenchError`` line; nothing runs."""
    path = Path(path)
    data = _read_yaml(path, "sweep file")
    if not is_sweep_file(data):
        raise MftBenchError(f"{path}: not a sweep file (no 'sweep:' block); run a recipe with 'mft-bench run'")
    block = data["sweep"]
    if not isinstance(block, dict):
        raise MftBenchError(f"{path}: sweep must be a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(block) - set(SWEEP_KEYS))
    if unknown:
        raise MftBenchError(f"{path}: unknown key 'sweep.{unknown[0]}' (a sweep has {', '.join(SWEEP_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise MftBenchError(f"{path}: name must be a word of letters, digits, '.', '_' or '-', got {name!r}")
    raw, base_source = _base_data(path, data, block)
    raw = copy.deepcopy(raw)
    for key, value in _set_block(path, block):
        _set_raw(raw, key, value, f"{path}: sweep.set {'.'.join(key)}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    base = validate_recipe(raw, source=base_source)
    missing = [arm for arm in ("fft", "mft") if arm not in base.arms]
    if missing:
        raise MftBenchError(f"{path}: the base recipe lacks arms {missing}: a sweep compares MFT variants with FFT")
    axes = _axes(path, block, only_axes)
    sweep = Sweep(name=name, description=str(data.get("description") or ""), source=path, base=base,
                  axes={}, base_values={})
    sweep.variants.append(Variant(BASE_VARIANT, None, None, base))
    base_dump = base.model_dump(mode="json")
    for key, values in axes.items():
        sweep.base_values[key] = _lookup(base_dump, key.split("."))[1]
        sweep.axes[key] = []
        for value in values:
            variant = _variant(path, base, base_dump, key, value)
            if variant.value in sweep.axes[key]:
                raise MftBenchError(f"{path}: sweep axis '{key}' lists {variant.value!r} twice")
            sweep.axes[key].append(variant.value)
            if _without_name(variant.recipe) != _without_name(base):
                sweep.variants.append(variant)
    names = [v.name for v in sweep.variants]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise MftBenchError(f"{path}: two variants would share the folder {clash[0]}: make the axis values differ "
                            "more than in punctuation")
    return sweep


def _set_raw(raw: dict[str, Any], key: list[str], value: Any, where: str) -> None:
    """Set a dotted key in a (possibly partial) raw recipe mapping, creating mappings on the way."""
    node: Any = raw
    for depth, part in enumerate(key[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise MftBenchError(f"{where}: no list item {part} at '{'.'.join(key[:depth + 1])}'")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise MftBenchError(f"{where}: '{'.'.join(key[:depth + 1])}' is not a mapping")
    if isinstance(node, list):
        if not key[-1].isdigit() or int(key[-1]) >= len(node):
            raise MftBenchError(f"{where}: no list item {key[-1]}")
        node[int(key[-1])] = value
    else:
        node[key[-1]] = value


def _axes(path: Path, block: dict[str, Any], only: list[str] | None) -> dict[str, list[Any]]:
    axes = block.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise MftBenchError(f"{path}: sweep.axes must map at least one dotted recipe key to a list of values "
                            "(e.g. mask.mask_ratio: [0.05, 0.2])")
    for key, values in axes.items():
        if not isinstance(values, list):
            raise MftBenchError(f"{path}: sweep axis '{key}' must be a list of values, got {values!r}")
        if not values:
            raise MftBenchError(f"{path}: sweep axis '{key}' has no values: list at least one, or remove the axis")
    if only:
        unknown = [key for key in only if key not in axes]
        if unknown:
            raise MftBenchError(f"--axis {unknown[0]}: {path} has no such axis; its axes are {', '.join(axes)}")
        axes = {key: values for key, values in axes.items() if key in only}
    return {str(key): values for key, values in axes.items()}


def _variant(path: Path, base: Recipe, base_dump: dict[str, Any], key: str, value: Any) -> Variant:
    dotted = key.split(".")
    if key in ("name", "output_dir") or not _lookup(base_dump, dotted)[0]:
        raise MftBenchError(f"{path}: sweep axis '{key}' is not a recipe key (axes are dotted keys of the recipe, "
                            "e.g. mask.layers, mask.mask_ratio, mft.learning_rate, mask.mode)")
    data = copy.deepcopy(base_dump)
    _assign(data, dotted, value)
    folder = f"{key}-{value_slug(value)}"
    data["name"] = f"{base.name}.{folder}"
    data["output_dir"] = None
    recipe = validate_recipe(data, source=f"{path}: sweep axis {key}={value!r}")
    validated = _lookup(recipe.model_dump(mode="json"), dotted)[1]
    folder = f"{key}-{value_slug(validated)}"
    if f"{base.name}.{folder}" != recipe.name:  # the validated value reads differently (e.g. layers sorted)
        recipe = validate_recipe({**recipe.model_dump(mode="json"), "name": f"{base.name}.{folder}"},
                                 source=f"{path}: sweep axis {key}={value!r}")
    return Variant(folder, key, validated, recipe)


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    """What ``SWEEP/sweep.yaml`` records: the file, the base recipe as run, the axes and the variants."""
    return {
        "sweep": sweep.name,
        "source": str(sweep.source),
        "base": sweep.base.model_dump(mode="json"),
        "axes": sweep.axes,
        "base_values": sweep.base_values,
        "variants": [{"name": v.name, "axis": v.axis, "value": v.value, "recipe": v.recipe.name}
                     for v in sweep.variants],
    }


def check_sweep_dir(sweep: Sweep, out_dir: Path) -> None:
    """Refuse a sweep folder that holds another sweep (their variants and tables would be mixed)."""
    record = out_dir / SWEEP_RECORD
    if record.is_file():
        try:
            existing = (yaml.safe_load(record.read_text()) or {}).get("sweep")
        except (yaml.YAMLError, OSError, AttributeError):
            existing = None
        if existing and existing != sweep.name:
            raise MftBenchError(f"sweep folder {out_dir} holds sweep '{existing}', not '{sweep.name}': choose "
                                "another --out")


def variant_dir(out_dir: Path, variant: Variant) -> Path:
    return out_dir / "variants" / variant.name


def stages_dir(out_dir: Path) -> Path:
    return out_dir / "stages"


def plan_sweep(sweep: Sweep, out_dir: Path) -> list[dict[str, Any]]:
    """Per variant: its stages, which of them other variants share, and which are already finished. Nothing runs."""
    from mft_bench.stages import build_plan

    plans = {v.name: build_plan(v.recipe, variant_dir(out_dir, v), stages_dir(out_dir)) for v in sweep.variants}
    users: dict[Path, int] = {}
    for stages in plans.values():
        for stage in stages:
            users[stage.folder] = users.get(stage.folder, 0) + 1
    rows = []
    for variant in sweep.variants:
        stages = plans[variant.name]
        rows.append({"variant": variant.name, "axis": variant.axis, "value": variant.value,
                     "stages": [s.name for s in stages],
                     "own": [s.name for s in stages if users[s.folder] == 1],
                     "shared": [s.name for s in stages if users[s.folder] > 1],
                     "done": [s.name for s in stages if s.done()],
                     "folders": {s.name: s.folder for s in stages}})
    return rows


def run_sweep(sweep: Sweep, out_dir: Path, *, progress=None, variant_progress=None, procs=None,
              selection: str = "last") -> list[Path]:
    """Run every variant (base first) into ``out_dir`` under one lock, then write the cross-run table. Returns
    the table's files (on the main process; [] on the others)."""
    from mft_bench.distributed import RunProcesses
    from mft_bench.run import run_recipe
    from mft_bench.report.sweep_table import write_sweep_table
    from mft_bench.run_folder import RunLock

    procs = procs or RunProcesses.from_environment()
    out_dir = Path(out_dir)
    procs.on_main(check_sweep_dir, sweep, out_dir)
    lock = RunLock(out_dir)
    procs.on_main(lock.acquire)  # the variants' stages live in one folder: one sweep at a time writes it
    try:
        procs.on_main(_write_record, sweep, out_dir)
        for index, variant in enumerate(sweep.variants, start=1):
            if variant_progress and procs.is_main:
                variant_progress(index, len(sweep.variants), variant)
            run_recipe(variant.recipe, variant_dir(out_dir, variant), progress=progress, procs=procs,
                       stages_dir=stages_dir(out_dir))
        entries = [{"variant": v.name, "axis": v.axis, "value": v.value, "run_dir": variant_dir(out_dir, v)}
                   for v in sweep.variants]
        return procs.on_main(write_sweep_table, entries, out_dir, sweep=sweep.name, base_recipe=sweep.base.name,
                             base_values=sweep.base_values, selection=selection) or []
    finally:
        lock.release()


def _write_record(sweep: Sweep, out_dir: Path) -> None:
    from mft_bench.atomic import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / SWEEP_RECORD, yaml.safe_dump(sweep_record(sweep), sort_keys=False))


def render_sweep_plan(sweep: Sweep, out_dir: Path) -> str:
    """``mft-bench sweep --dry-run``: the variants, the settings they vary, and which stages they share."""
    from mft_bench.arms import trained_arms
    from mft_bench.report.sweep_table import format_value

    rows = plan_sweep(sweep, out_dir)
    folders = {folder for row in rows for folder in row["folders"].values()}
    planned = sum(len(row["stages"]) for row in rows)
    training = {}
    for row in rows:
        for name, folder in row["folders"].items():
            if name in trained_arms():
                training.setdefault(name, set()).add(folder)
    done = {folder for row in rows for name, folder in row["folders"].items() if name in row["done"]}
    width = max(len(row["variant"]) for row in rows)
    lines = [f"sweep {sweep.name}: {len(rows)} variants one factor at a time around {sweep.base.name} "
             f"({sweep.base.backbone.name}); folder {out_dir}",
             f"{'variant':<{width}}  {'varied setting':<40}stages: own / shared / finished"]
    for row in rows:
        setting = f"{row['axis']} = {format_value(row['value'])}" if row["axis"] else "(base)"
        lines.append(f"{row['variant']:<{width}}  {setting:<40}{len(row['own']):>6} / {len(row['shared']):>6} / "
                     f"{len(row['done']):>8}")
    counts = ", ".join(f"{arm} x{len(found)}" for arm, found in training.items())
    lines.append(f"{len(folders)} distinct stages for {planned} planned ({planned - len(folders)} reuses); "
                 f"training runs: {counts}; {len(done)} finished already")
    lines.append("cost of one variant: mft-bench plan on its recipe (the variants' stages are those of their recipes)")
    return "\n".join(lines)
