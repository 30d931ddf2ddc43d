"""``mft-bench``: parse, call, print, exit. Exit codes: 0 ok, 1 regression or failed run, 2 bad input."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
from pathlib import Path

from mft_bench.errors import MftBenchError
from mft_bench.resources import tasks_dir

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PAPER_BACKBONES = ("llama2-7b", "llama3.1-8b")
PAPER_DOMAINS = ("math", "coding", "instruction")


class _Parser(argparse.ArgumentParser):
    """argparse, but bad command lines exit 2 with one line (argparse's own code is 2 too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"mft-bench: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def resolve_recipe(arg: str) -> Path:
    """A recipe path, or a recipe name under tasks/ (``default``, ``paper/llama2-7b-math``)."""
    path = Path(arg)
    if path.is_file():
        return path
    for candidate in (tasks_dir() / arg, tasks_dir() / f"{arg}.yaml"):
        if candidate.is_file():
            return candidate
    raise MftBenchError(f"recipe not found: {arg} (give a YAML path or a name from 'mft-bench list')")


def _split_overrides(values: list[str]) -> list[str]:
    for value in values:
        if "=" not in value:
            raise MftBenchError(f"unexpected argument '{value}': overrides look like KEY=VALUE")
    return values


def _load(args) -> "object":
    from mft_bench.recipe import load_recipe

    return load_recipe(resolve_recipe(args.recipe), _split_overrides(args.overrides))


def _run_dir(recipe, out: str | None) -> Path:
    from mft_bench.run import default_run_dir

    return Path(out) if out else default_run_dir(recipe)


def _progress(stage, status: str) -> None:
    if status != "done":
        print(f"[{status:>7}] {stage.name}", flush=True)


def _relaunch(nproc: int, argv: list[str], recipes: list) -> int:
    """Start ``nproc`` processes of the same command without ``--nproc`` (see ``distributed.launch``), once the
    machine and every recipe's global batches are known to allow ``nproc`` processes."""
    from mft_bench.distributed import check_process_count, launch
    from mft_bench.arms import trained_arms

    check_process_count(nproc)
    for recipe in recipes:
        for arm in trained_arms():
            if arm in recipe.arms:
                recipe.train_spec(arm).accumulation_steps(nproc)
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return launch(rest, nproc)


def cmd_run(args) -> int:
    from mft_bench.run import run_recipe

    recipe = _load(args)  # bad recipes are refused before any process starts
    run_dir = _run_dir(recipe, args.out)
    if args.nproc > 1:
        return _relaunch(args.nproc, args.argv, [recipe])
    report = run_recipe(recipe, run_dir, force=args.force, progress=_progress)
    if not _is_main_process():
        return EXIT_OK
    table = run_dir / "report.md"
    if table.is_file():
        print(table.read_text())
    print(f"run folder: {run_dir}")
    return EXIT_OK if report.get("rows") else EXIT_FAILED


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _planned_hardware(args):
    """The machine a plan is for: ``--hardware NAME`` (a GPU kind) or this machine; and the process count."""
    from mft_bench.hardware import detect_hardware, hardware_by_name

    if args.nproc < 1:
        raise MftBenchError(f"--nproc must be at least 1, got {args.nproc}")
    return (hardware_by_name(args.hardware) if args.hardware else detect_hardware()), args.nproc


def cmd_plan(args) -> int:
    from mft_bench.plan import render_plan

    recipe = _load(args)
    hardware, nproc = _planned_hardware(args)
    print(render_plan(recipe, _run_dir(recipe, args.out), hardware=hardware, nproc=nproc))
    return EXIT_OK


def paper_recipes(backbone: str) -> list[Path]:
    return [tasks_dir() / "paper" / f"{backbone}-{domain}.yaml" for domain in PAPER_DOMAINS]


def cmd_reproduce(args) -> int:
    from mft_bench.recipe import load_recipe

    if args.target != "paper":
        raise MftBenchError(f"reproduce: unknown target '{args.target}' (only 'paper')")
    if not args.dry_run and args.hardware:
        raise MftBenchError("reproduce: --hardware plans a run for that GPU kind (--dry-run); a run uses this "
                            "machine's GPUs")
    recipes = [load_recipe(path) for path in paper_recipes(args.backbone)]
    out = Path(args.out or "runs/paper")
    if args.dry_run:
        from mft_bench.plan import plan_text, render_bill

        hardware, nproc = _planned_hardware(args)
        summaries = []
        for recipe in recipes:
            text, summary = plan_text(recipe, out / recipe.name, hardware=hardware, nproc=nproc)
            print(text + "\n")
            if summary is not None:
                summaries.append(summary)
        if summaries:
            print(render_bill(summaries))
        return EXIT_OK
    if args.nproc > 1:
        return _relaunch(args.nproc, args.argv, recipes)
    from mft_bench.report import write_paper_table
    from mft_bench.run import run_recipe

    run_dirs = []
    for recipe in recipes:
        run_recipe(recipe, out / recipe.name, progress=_progress)
        run_dirs.append(out / recipe.name)
    if not _is_main_process():
        return EXIT_OK
    for path in write_paper_table(run_dirs, out):
        if path.suffix == ".md":
            print(path.read_text())
    return EXIT_OK


def cmd_sweep(args) -> int:
    from mft_bench.sweep import load_sweep, render_sweep_plan, run_sweep

    sweep = load_sweep(resolve_recipe(args.sweep), _split_overrides(args.overrides), args.axis)
    out = Path(args.out or Path("runs") / "sweeps" / sweep.name)
    if args.dry_run:
        print(render_sweep_plan(sweep, out))
        return EXIT_OK
    if args.nproc > 1:
        return _relaunch(args.nproc, args.argv, [variant.recipe for variant in sweep.variants])

    def announce(index: int, total: int, variant) -> None:
        setting = f"{variant.axis}={variant.value}" if variant.axis else "the base recipe"
        print(f"== variant {index}/{total}: {variant.name} ({setting})", flush=True)

    files = run_sweep(sweep, out, progress=_progress, variant_progress=announce, selection=args.selection)
    if not _is_main_process():
        return EXIT_OK
    for path in files:
        if path.suffix == ".md":
            print(path.read_text())
    print(f"sweep folder: {out}")
    return EXIT_OK


def cmd_report(args) -> int:
    from mft_bench.report import build_report, write_paper_table, write_report

    run_dirs = [Path(d) for d in args.run_dirs]
    for run_dir in run_dirs:
        if not (run_dir / "run.json").is_file():
            raise MftBenchError(f"{run_dir}: not a run folder (no run.json); run a recipe first")
    for run_dir in run_dirs:
        write_report(build_report(run_dir), run_dir)
        print((run_dir / "report.md").read_text())
    if len(run_dirs) > 1:
        out = Path(args.out or run_dirs[0].parent)
        for path in write_paper_table(run_dirs, out):
            if path.suffix == ".md":
                print(path.read_text())
    return EXIT_OK


def cmd_check(args) -> int:
    """A run folder against a run reference, or a sweep folder (``sweep.yaml`` in it) variant by variant against a
    sweep reference; ``--update`` writes the reference instead."""
    from mft_bench.report import check_against_reference, write_reference
    from mft_bench.report.collect import read_json

    run_dir = Path(args.run_dir)
    if (run_dir / "sweep.yaml").is_file():
        return _check_sweep(args, run_dir)

    report = _read_report(run_dir)
    reference_path = Path(args.reference)
    if args.update:
        write_reference(report, reference_path, tolerance=args.tolerance)
        print(f"reference written: {reference_path}")
        return EXIT_OK
    if not reference_path.is_file():
        raise MftBenchError(f"reference file not found: {reference_path} (create one with --update)")
    reference = read_json(reference_path, "reference")
    return _verdict(check_against_reference(report, reference), len(reference["metrics"]), reference_path)


def _check_sweep(args, sweep_dir: Path) -> int:
    import yaml

    from mft_bench.atomic import dumps_json, write_text_atomic
    from mft_bench.report.check import check_sweep_against_reference, sweep_reference
    from mft_bench.report.collect import read_json

    record = yaml.safe_load((sweep_dir / "sweep.yaml").read_text(encoding="utf-8")) or {}
    names = [v["name"] for v in record.get("variants") or []]
    reports = {name: _read_report(sweep_dir / "variants" / name) for name in names
               if (sweep_dir / "variants" / name / "report.json").is_file()}
    reference_path = Path(args.reference)
    if args.update:
        missing = [name for name in names if name not in reports]
        if missing:
            raise MftBenchError(f"{sweep_dir}: variants {', '.join(missing)} have no report.json; finish the sweep "
                                "before writing its reference")
        reference = sweep_reference(reports, sweep=str(record.get("sweep") or sweep_dir.name), tolerance=args.tolerance)
        write_text_atomic(reference_path, dumps_json(reference))
        print(f"reference written: {reference_path}")
        return EXIT_OK
    if not reference_path.is_file():
        raise MftBenchError(f"reference file not found: {reference_path} (create one with --update)")
    reference = read_json(reference_path, "reference")
    failures = check_sweep_against_reference(reports, reference)
    count = sum(len(v.get("metrics") or []) for v in reference["variants"].values())
    return _verdict(failures, count, reference_path)


def _read_report(run_dir: Path) -> dict:
    from mft_bench.report.collect import read_json

    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise MftBenchError(f"{run_dir}: no report.json; run the recipe (or 'mft-bench report') first")
    report = read_json(report_path, "report")
    if not isinstance(report, dict):
        raise MftBenchError(f"{report_path} must hold a JSON object; rebuild it with 'mft-bench report'")
    return report


def _verdict(failures: list[str], count: int, reference_path: Path) -> int:
    for line in failures:
        print(f"REGRESSION {line}")
    if failures:
        return EXIT_FAILED
    print(f"ok: {count} metrics within tolerance of {reference_path}")
    return EXIT_OK


def cmd_list(args) -> int:
    import yaml

    root = tasks_dir()
    for path in sorted(root.rglob("*.yaml")):
        if "accelerate" in path.parts or "lm_eval" in path.parts:
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        name = str(path.relative_to(root).with_suffix(""))
        description = str(data.get("description", "")).strip().splitlines()
        print(f"{name:<28} {description[0] if description else ''}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mft-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train every arm of a recipe, evaluate, write the report")
    run.add_argument("recipe", help="recipe YAML path or name under tasks/")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. fft.epochs=1")
    run.add_argument("--out", help="run folder (default: the recipe's output_dir or runs/<name>)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="redo a stage and its dependents (old folder moved aside); repeatable")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="processes: one per GPU (on a machine without GPUs, N gloo CPU processes)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="dry run: stages, cache status, estimated time, memory per GPU, disk")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    plan.add_argument("--out")
    _planning_options(plan)
    plan.set_defaults(func=cmd_plan)

    reproduce = sub.add_parser("reproduce", help="run all paper recipes and print the paper-shaped table")
    reproduce.add_argument("target", help="'paper'")
    reproduce.add_argument("--backbone", choices=PAPER_BACKBONES, default="llama2-7b")
    reproduce.add_argument("--dry-run", action="store_true", help="only plan, and print the whole bill")
    reproduce.add_argument("--out")
    _planning_options(reproduce)
    reproduce.set_defaults(func=cmd_reproduce)

    sweep = sub.add_parser("sweep", help="one-factor-at-a-time ablations of a base recipe, sharing common stages; "
                                         "one cross-run table")
    sweep.add_argument("sweep", help="sweep YAML path or name under tasks/ (e.g. sweeps/smoke-sweep)")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="set in every variant, e.g. fft.epochs=1")
    sweep.add_argument("--out", help="sweep folder (default: runs/sweeps/<name>)")
    sweep.add_argument("--dry-run", action="store_true", help="list the variants and the stages they share")
    sweep.add_argument("--axis", action="append", default=[], metavar="KEY", help="run only this axis; repeatable")
    sweep.add_argument("--selection", choices=("last", "val", "test-selected"), default="last",
                       help="checkpoint whose numbers the table shows (default: the last)")
    sweep.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="processes: one per GPU (on a machine without GPUs, N gloo CPU processes)")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="rebuild tables and plots of run folders (several: paper-shaped table)")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--out", help="where the cross-recipe table goes")
    report.set_defaults(func=cmd_report)

    check = sub.add_parser("check", help="compare a run (or a sweep folder, variant by variant) against a "
                                          "reference; exit 1 on regression")
    check.add_argument("run_dir")
    check.add_argument("--reference", required=True)
    check.add_argument("--update", action="store_true", help="write the run's metrics as the new reference")
    check.add_argument("--tolerance", type=float, default=None, help="with --update: tolerance for every metric")
    check.set_defaults(func=cmd_check)

    listing = sub.add_parser("list", help="list shipped recipes")
    listing.set_defaults(func=cmd_list)
    return parser


def _planning_options(parser: argparse.ArgumentParser) -> None:
    from mft_bench.hardware import known_gpu_names

    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes, one per GPU (on a machine without GPUs, N gloo CPU processes); with plan "
                             "or --dry-run: plan for N")
    parser.add_argument("--hardware", metavar="NAME",
                        help=f"plan for this GPU kind ({', '.join(known_gpu_names())}); default: this machine")


DISK_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the disk is read-only"}


def disk_problem(exc: BaseException, out: str | None) -> str | None:
    """One line for a full or read-only disk, else None: an OSError says so by its errno; libraries that write
    files themselves (torch, safetensors) raise their own errors, recognised by the OS message they carry or by
    the run folder's disk being full."""
    code = exc.errno if isinstance(exc, OSError) else next(
        (number for number, text in ((errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                     (errno.EDQUOT, "Disk quota exceeded")) if text in str(exc)), None)
    if code is None and out and Path(out).exists():
        usage = shutil.disk_usage(out)
        if usage.free < 0.01 * usage.total or usage.free < 2**20:
            code = errno.ENOSPC
    if code not in DISK_ERRNOS:
        return None
    where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else f" ({out})" if out else ""
    return f"{DISK_ERRNOS[code]}{where}; free space (or choose another --out) and rerun: finished stages are kept"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """argparse, with ``KEY=VALUE`` overrides accepted anywhere after the recipe (``run R --out X a.b=1``): argparse
    alone stops collecting positionals at the first option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [arg for arg in extra if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    from mft_bench.distributed import ElsewhereError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    main_process = _is_main_process()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the other processes of a run log warnings only: one process's progress is enough to read
    logging.getLogger("mft_bench").setLevel(logging.DEBUG if args.verbose else logging.INFO if main_process
                                            else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # our own progress lines say enough
    try:
        return args.func(args)
    except ElsewhereError as exc:  # another process of the run failed; the main process says what happened
        if main_process:
            print(f"mft-bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if exc.bad_input else EXIT_FAILED
    except MftBenchError as exc:
        if main_process:
            print(f"mft-bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if main_process:
            print("mft-bench: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a full disk is one line; anything else is raised as it was
        line = disk_problem(exc, getattr(args, "out", None))
        if line is None:
            raise
        if main_process:
            print(f"mft-bench: error: {line}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
