"""Bad input: exit code 2, one line naming the problem, no traceback, no hang, nothing written anywhere.

One case a line in ``CASES``: (id, CLI argv, words the error line must hold, files to write first). In argv and in
text files, ``{tmp}`` is the case's scratch folder, ``{out}`` a run folder that already holds a run of the smoke
recipe, ``{smoke}`` the smoke recipe. Files are bytes (written as is), text, or a recipe mapping (written as YAML).
Every case checks: exit 2, exactly one line on stderr, the expected words in it, no traceback, done within
``CASE_SECONDS``, and every file under the scratch folder byte-identical afterwards: no stage ran (it would have
made its folder) and the existing run is as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE_PATH = ROOT / "tasks" / "smoke.yaml"
SMOKE = yaml.safe_load(SMOKE_PATH.read_text())
CASE_SECONDS = 60  # most cases take well under a second; the slowest imports lm-eval and searches its task files
HANG_SECONDS = 120  # a case still running by then hangs: stop it and fail


def smoke(**changes) -> dict:
    """The smoke recipe with ``a__b__0__c=value`` changes (``...`` deletes the key)."""
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is ...:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def bench(name: str, **options) -> dict:
    return {"name": name, "options": options} if options else {"name": name}


def billion_laughs() -> str:
    """A YAML alias bomb under a benchmark's options: 9 aliases of 9 aliases ... 9^9 strings once expanded."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    recipe = smoke(evaluation__benchmarks=[bench("synthetic_math", n=4, max_new_tokens=8)])
    text = yaml.safe_dump(recipe, sort_keys=False).replace("max_new_tokens: 8", "max_new_tokens: 8\n      bomb: *l8")
    return "x-anchors:\n" + "".join(f"  {line}\n" for line in lines) + text


R = "{tmp}/recipe.yaml"  # the recipe a case writes


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expected: str
    files: dict = field(default_factory=dict)
    unprivileged: bool = False  # refused only for a user without root's permissions: run as 'nobody' under root


def case(id: str, argv: str, expected: str, files: dict | None = None, **kwargs) -> Case:
    return Case(id, tuple(argv.split()), expected, files or {}, **kwargs)


def recipe_case(id: str, recipe, expected: str, extra: str = "") -> Case:
    """``run`` of a recipe file (mapping, text or bytes) on the existing run folder."""
    return case(id, f"run {R} --out {{out}} {extra}".strip(), expected, {"recipe.yaml": recipe})


def override_case(id: str, overrides: str, expected: str) -> Case:
    """``run`` of the smoke recipe with ``KEY=VALUE`` overrides after the options, on the existing run folder."""
    return case(id, f"run {{smoke}} --out {{out}} {overrides}", expected)


CASES = [
    # -- the recipe file: YAML itself
    recipe_case("missing recipe file", None, "recipe not found"),
    recipe_case("empty recipe file", "", "recipe file is empty"),
    recipe_case("malformed YAML", "name: x\n  arms: [fft\n", "malformed YAML at line"),
    recipe_case("recipe not a mapping", "- a\n- b\n", "mapping"),
    recipe_case("non-UTF-8 recipe", b"name: smoke\ndescription: caf\xe9\n", "not UTF-8"),
    recipe_case("binary recipe", bytes(range(256)) * 4, "not UTF-8"),
    recipe_case("deeply nested YAML", "name: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper than"),
    recipe_case("duplicate YAML key", yaml.safe_dump(SMOKE, sort_keys=False) + "seed: 7\n", "key 'seed' twice"),
    recipe_case("nested duplicate key", yaml.safe_dump(SMOKE, sort_keys=False).replace(
        "  mask_ratio: 0.1\n", "  mask_ratio: 0.1\n  mask_ratio: 0.2\n"), "key 'mask_ratio' twice"),
    recipe_case("YAML alias bomb", billion_laughs(), "aliases expand"),
    recipe_case("alias into itself", yaml.safe_dump(SMOKE) + "x-loop: &loop [*loop]\n", "contains it"),
    # -- recipe values
    recipe_case("unknown key", smoke(surprise=1), "unknown key 'surprise'"),
    recipe_case("misspelt nested key", smoke(fft__learning_rat=1e-3), "unknown key 'fft.learning_rat'"),
    recipe_case("missing data", smoke(data=...), "missing required key 'data'"),
    recipe_case("arms need fft", smoke(arms=["pretrained", "mft"]), "add 'fft' to arms"),
    recipe_case("unknown arm", smoke(arms=["pretrained", "dpo"]), "arms: unknown arm 'dpo'"),
    recipe_case("arm of an earlier version", smoke(arms=["baseline", "fft"]),
                "arm 'baseline' is now called 'pretrained'"),
    recipe_case("empty layer list", smoke(mask__layers=[]), "mask.layers"),
    recipe_case("negative layer", smoke(mask__layers=[-1]), "mask.layers"),
    override_case("mask ratio above 1", "mask.mask_ratio=1.5", "mask.mask_ratio: must be in (0, 1)"),
    override_case("mask ratio 0", "mask.mask_ratio=0", "mask.mask_ratio"),
    override_case("seed not a number", "seed=zero", "seed"),
    override_case("negative seed", "seed=-1", "seed: must be an integer from 0 to 4294967295"),
    override_case("seed beyond 2**32", "seed=1e23", "seed: must be an integer from 0 to 4294967295"),
    override_case("epochs not a number", "fft.epochs=many", "fft.epochs"),
    override_case("astronomic epochs", "fft.epochs=1e308", "fft.epochs: Input should be less than or equal to"),
    override_case("infinite learning rate", "fft.learning_rate=.inf", "fft.learning_rate: Input should be a finite"),
    override_case("NaN learning rate", "mft.learning_rate=.nan", "mft.learning_rate: Input should be a finite"),
    override_case("zero max_steps", "lora.max_steps=0", "lora.max_steps"),
    override_case("unknown scheduler", "fft.lr_scheduler=cosine_forever", "fft.lr_scheduler"),
    override_case("max_length too small", "data.max_length=8", "data.max_length 8"),
    override_case("rows beyond memory", "data.sources.0.rows=1000000000000", "rows 1000000000000"),
    override_case("validation rows take every row", "data.validation_rows=24", "validation_rows"),
    # -- benchmarks and their options
    recipe_case("unknown benchmark", smoke(evaluation__benchmarks=[bench("gsm9k")]), "unknown benchmark 'gsm9k'"),
    override_case("unknown benchmark option", "evaluation.benchmarks.1.options.shots=3",
                  "benchmark 'gsm8k': unknown option 'shots'"),
    override_case("n_samples 0", "evaluation.benchmarks.2.options.n_samples=0", "options.n_samples"),
    override_case("max_new_tokens abc", "evaluation.benchmarks.4.options.max_new_tokens=abc",
                  "options.max_new_tokens: Input should be a valid integer"),
    override_case("max_new_tokens 0", "evaluation.benchmarks.0.options.max_new_tokens=0", "options.max_new_tokens"),
    override_case("n_samples without temperature", "evaluation.benchmarks.2.options.n_samples=5",
                  "needs temperature > 0"),
    override_case("synthetic split unknown", "evaluation.benchmarks.0.options.split=dev", "options.split"),
    override_case("benchmark fixes variant", "evaluation.benchmarks.2.options.variant=plain", "fixes option"),
    recipe_case("unknown lm-eval task", smoke(evaluation__benchmarks=[bench("lm_eval:no_such_task")]),
                "lm-eval task 'no_such_task' not found"),
    recipe_case("unknown lm-eval option", smoke(evaluation__benchmarks=[bench("lm_eval:arc_easy", shots=5)]),
                "unknown option 'shots'"),
    recipe_case("lm-eval seed out of range", smoke(evaluation__benchmarks=[bench("lm_eval:arc_easy",
                                                                                  seeds={"fewshot": -1})]), "seeds"),
    # -- what needs the model or the data (refused in preflight, before the first stage)
    override_case("LoRA module that does not exist", "lora.target_modules=[nosuch]",
                  "lora.target_modules: no module 'nosuch'"),
    override_case("mask layer beyond the model", "mask.layers=[2,40]", "mask.layers"),
    override_case("mask module that does not exist", "mask.modules=[q_proj,foo_proj]", "foo_proj"),
    override_case("unknown tiny backbone", "backbone.name=tiny:transformer9000", "tiny"),
    override_case("folder that is not a model", "backbone.name={tmp}", "backbone"),
    override_case("missing data file", "data.sources.0.name=/nonexistent/data.jsonl", "/nonexistent/data.jsonl"),
    case("empty data file", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.jsonl", "rows.jsonl is empty",
         {"rows.jsonl": b""}),
    case("non-JSON data file", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.jsonl",
         "rows.jsonl line 1 is not JSON", {"rows.jsonl": "question, answer\nwhat, that\n"}),
    case("binary data file", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.jsonl", "not UTF-8",
         {"rows.jsonl": bytes(range(256)) * 8}),
    case("JSON file that is not JSON", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.json",
         "rows.json is not JSON", {"rows.json": "{'question': 1}"}),
    case("parquet file that is not parquet", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.parquet",
         "not a parquet file", {"rows.parquet": "a,b\n1,2\n"}),
    case("rows without the needed fields", "run {smoke} --out {out} data.sources.0.name={tmp}/rows.jsonl",
         "rows.jsonl", {"rows.jsonl": '{"prompt": "a", "completion": "b"}\n' * 30}),
    # -- the command line and the run folder
    case("unknown command", "frobnicate", "invalid choice"),
    case("stray argument", "run {smoke} --out {out} epochs", "unrecognized arguments: epochs"),
    case("D7: override after --out is an override", "run {smoke} --out {out} fft.nonsense=1",
         "unknown key 'fft.nonsense'"),
    case("bad recipe never rewrites a run folder", "run {smoke} --out {out} mask.layers=[99]", "mask.layers"),
    case("unknown --force stage writes nothing", "run {smoke} --out {out} --force nosuch seed=5",
         "--force nosuch: no such stage"),
    case("run folder of another recipe", "run {smoke} --out {tmp}/other", "someone-else",
         {"other/run.json": '{"recipe": "someone-else"}'}),
    case("--out is a file", "run {smoke} --out {tmp}/afile", "is a file", {"afile": "x"}),
    case("--out under a file", "run {smoke} --out {tmp}/afile/run", "is a file", {"afile": "x"}),
    case("--out read-only", "run {smoke} --out {tmp}/locked/run", "not writable", {"locked/keep": ""},
         unprivileged=True),
    # -- check and report
    case("check without report.json", "check {tmp} --reference {tmp}/ref.json", "no report.json"),
    case("check with missing reference", "check {tmp}/run --reference {tmp}/ref.json", "reference file not found",
         {"run/report.json": '{"recipe": "smoke", "rows": []}'}),
    case("check with a binary reference", "check {tmp}/run --reference {tmp}/ref.json", "not UTF-8",
         {"run/report.json": '{"recipe": "smoke", "rows": []}', "ref.json": bytes(range(256))}),
    case("check with an empty metrics list", "check {tmp}/run --reference {tmp}/ref.json", "no metrics",
         {"run/report.json": '{"recipe": "smoke", "rows": []}', "ref.json": '{"recipe": "smoke", "metrics": []}'}),
    case("check with a corrupt report.json", "check {tmp}/run --reference {tmp}/ref.json", "report.json",
         {"run/report.json": '{"recipe": ', "ref.json": '{"recipe": "smoke", "metrics": []}'}),
    case("report on a folder that is not a run", "report {tmp}", "not a run folder"),
    case("report on a non-UTF-8 run.json", "report {tmp}/run", "not UTF-8", {"run/run.json": b'{"recipe": "\xff"}'}),
    case("report on a list-shaped run.json", "report {tmp}/run", "must hold a JSON object", {"run/run.json": "[1, 2]"}),
]


def _existing_run(out: Path) -> None:
    """A run folder of the smoke recipe as an earlier run left it: its recipe, run.json and a finished stage."""
    from mft_bench.recipe import load_recipe, recipe_yaml

    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(recipe_yaml(load_recipe(SMOKE_PATH)))
    (out / "run.json").write_text('{"recipe": "smoke", "evaluations": []}\n')
    (out / "stages" / "data-0123456789ab").mkdir(parents=True)
    (out / "stages" / "data-0123456789ab" / "manifest.json").write_text('{"stage": "data"}\n')


def _write_files(root: Path, files: dict) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            continue
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content.format(tmp=root) if "{tmp}" in content else content)
        else:
            path.write_text(yaml.safe_dump(content, sort_keys=False))


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


class _Hung(Exception):
    pass


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    def hung(signum, frame):
        raise _Hung(f"still running after {HANG_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_SECONDS)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def _run_as_nobody(argv: list[str], capsys) -> tuple[int, str]:
    """The command in a forked process that dropped root for user 'nobody' (root writes into read-only folders, so
    a read-only folder means nothing to it). The modules it needs are imported first: the interpreter's own files
    may be closed to other users."""
    from mft_bench import run, stage_runners  # noqa: F401
    from mft_bench.train import strategy  # noqa: F401

    assert main(["plan", str(SMOKE_PATH), "--out", "/nonexistent"]) == 0
    capsys.readouterr()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child exits without returning to pytest
        code = 99
        try:
            os.close(read)
            sys.stderr = os.fdopen(write, "w")
            os.setgid(65534)
            os.setuid(65534)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as stream:
        err = stream.read()
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), err


@pytest.fixture
def case_root(request, tmp_path):
    """The case's scratch folder; one every user can reach for a case run as 'nobody' (pytest's is root's own)."""
    if not request.node.callspec.params["bad"].unprivileged or os.geteuid() != 0:
        yield tmp_path / "case"
        return
    shared = Path(tempfile.mkdtemp(prefix="mft-bench-bad-input-"))
    shared.chmod(0o755)
    try:
        yield shared / "case"
    finally:
        for folder in shared.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(shared)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_2(bad: Case, case_root, capsys):
    root = case_root
    out = root / "out"
    _existing_run(out)
    _write_files(root, bad.files)
    argv = [arg.format(tmp=root, out=out, smoke=SMOKE_PATH) for arg in bad.argv]
    as_nobody = bad.unprivileged and os.geteuid() == 0
    if bad.unprivileged:
        (root / "locked").chmod(0o555)
    before = _snapshot(root)
    start = time.monotonic()
    code, err = _run_as_nobody(argv, capsys) if as_nobody else _run_in_process(argv, capsys)
    elapsed = time.monotonic() - start
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("mft-bench: error:"), err
    assert bad.expected in lines[0], lines[0]
    assert elapsed < CASE_SECONDS, f"took {elapsed:.1f} s"
    assert _snapshot(root) == before, "bad input changed files"


def test_override_after_options_is_applied(tmp_path, capsys):
    """D7: ``run R --out X a.b=1`` (the README's usage) takes the override: the plan's FFT stage doubles its work."""
    from mft_bench.cli import parse_arguments

    args = parse_arguments(["run", str(SMOKE_PATH), "--out", str(tmp_path), "fft.epochs=2", "--force", "fft"])
    assert args.overrides == ["fft.epochs=2"] and args.force == ["fft"] and args.out == str(tmp_path)

    def fft_line(*overrides: str) -> str:
        assert main(["plan", str(SMOKE_PATH), "--out", str(tmp_path), *overrides]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fft "))

    assert fft_line("fft.epochs=2") != fft_line()


@pytest.mark.parametrize("argv", [["run", "{r}", "--out", "{out}"], ["run", "{smoke}", "--out", "{out}",
                                                                     "fft.learning_rate=.inf"]])
def test_the_real_command_prints_one_line(tmp_path, argv):
    """The installed command as a user runs it (logging to stderr as in a real run): the error is the only line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: " + "[" * 3000 + "]" * 3000 + "\n")
    args = [a.format(r=recipe, out=tmp_path / "out", smoke=SMOKE_PATH) for a in argv]
    done = subprocess.run([sys.executable, "-m", "mft_bench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=HANG_SECONDS)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("mft-bench: error:"), done.stderr
    assert not (tmp_path / "out").exists()


# -- what the checks must still accept ---------------------------------------------------------------------------
def test_anchors_and_merge_keys_are_still_yaml(tmp_path):
    """Strict YAML refuses a key twice and alias bombs, not aliases: a merge may override what it merges."""
    from mft_bench.recipe import load_recipe

    text = yaml.safe_dump(smoke(fft=..., mft=..., lora=...), sort_keys=False)
    text += ("fft: &train {epochs: 1, learning_rate: 1.0e-3, global_batch_size: 4, per_device_batch_size: 4}\n"
             "mft: *train\n"
             "lora: {<<: *train, learning_rate: 2.0e-3, r: 8}\n")
    recipe = load_recipe(_written(tmp_path / "r.yaml", text))
    assert recipe.mft == recipe.fft and recipe.lora.learning_rate == 2e-3 and recipe.lora.epochs == 1


def test_every_shipped_recipe_passes_the_recipe_checks():
    from mft_bench.recipe import load_recipe

    recipes = sorted((ROOT / "tasks").glob("*.yaml")) + sorted((ROOT / "tasks" / "paper").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        load_recipe(path)


def test_preflight_checks_accept_real_inputs(tmp_path, shared_data):
    """The model-, data- and lm-eval-side checks accept what exists: LoRA's default projections and qualified
    names, the smoke recipe's data and max_length, lm-eval's own tasks and groups, and the shipped offline ones."""
    from mft_bench.backbone import load_backbone
    from mft_bench.data.checks import check_data
    from mft_bench.evaluation.lm_eval_task import check_task_exists
    from mft_bench.recipe import load_recipe
    from mft_bench.train.lora import SEVEN_PROJECTIONS, check_target_modules

    recipe = load_recipe(SMOKE_PATH)
    model, tokenizer = load_backbone("tiny:llama")
    check_target_modules(model, [*SEVEN_PROJECTIONS, "self_attn.q_proj"])
    check_data(recipe.data.sources, seed=0, max_length=recipe.data.max_length, data_dir=None, tokenizer=tokenizer)
    rows = _written(tmp_path / "rows.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n' * 3)
    listed = _written(tmp_path / "rows.json", '[\n  {"instruction": "a", "output": "b"}\n]\n')
    check_data(load_recipe(SMOKE_PATH, [f"data.sources.0.name={rows}"]).data.sources + load_recipe(
        SMOKE_PATH, [f"data.sources.0.name={listed}"]).data.sources, seed=0, max_length=64, data_dir=None,
        tokenizer=tokenizer)
    for task in ("arc_easy", "mmlu", "gsm8k_local"):
        check_task_exists(task, data_dir=str(shared_data))


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
