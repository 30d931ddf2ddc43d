"""Bad input: exit code 2, one line naming the problem, no traceback, nothing finished changed."""

from pathlib import Path

import pytest
import yaml

from mft_bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = yaml.safe_load((ROOT / "tasks" / "smoke.yaml").read_text())


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _smoke(**changes):
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return data


def _run_bad(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("mft-bench: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("changes,expected", [
    ({"fft__learning_rat": 1e-3}, "unknown key 'fft.learning_rat'"),
    ({"surprise": 1}, "unknown key 'surprise'"),
    ({"seed": "zero"}, "seed"),
    ({"fft__epochs": "many"}, "fft.epochs"),
    ({"mask__mask_ratio": 1.5}, "mask.mask_ratio: must be in (0, 1)"),
    ({"mask__mask_ratio": 0.0}, "mask.mask_ratio"),
    ({"mask__layers": []}, "mask.layers"),
    ({"mask__layers": [-1]}, "mask.layers"),
    ({"evaluation__benchmarks": [{"name": "gsm9k"}]}, "gsm9k"),
    ({"arms": ["baseline", "mft"]}, "add 'fft' to arms"),
    ({"arms": ["baseline", "dpo"]}, "arms"),
    ({"data": ...}, "missing required key 'data'"),
])
def test_bad_recipe_values(tmp_path, capsys, changes, expected):
    line = _run_bad(capsys, ["plan", str(_write(tmp_path, _smoke(**changes)))])
    assert expected in line


def test_malformed_yaml(tmp_path, capsys):
    line = _run_bad(capsys, ["plan", str(_write(tmp_path, "name: x\n  arms: [fft\n"))])
    assert "malformed YAML" in line and "line" in line


def test_recipe_not_a_mapping(tmp_path, capsys):
    assert "mapping" in _run_bad(capsys, ["plan", str(_write(tmp_path, "- a\n- b\n"))])


def test_missing_recipe_file(tmp_path, capsys):
    assert "recipe not found" in _run_bad(capsys, ["plan", str(tmp_path / "nope.yaml")])


def test_bad_override_on_command_line(capsys):
    assert "unknown key 'fft.nonsense'" in _run_bad(capsys, ["plan", "tasks/smoke.yaml", "fft.nonsense=1"])


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize("changes,expected", [
    ({"mask__layers": [2, 40]}, "mask.layers"),
    ({"mask__modules": ["q_proj", "foo_proj"]}, "foo_proj"),
    ({"backbone__name": "tiny:transformer9000"}, "tiny"),
    ({"data__sources": [{"name": "/nonexistent/data.jsonl"}]}, "/nonexistent/data.jsonl"),
])
def test_bad_run_inputs_fail_before_training(tmp_path, capsys, changes, expected):
    out = tmp_path / "run"
    line = _run_bad(capsys, ["run", str(_write(tmp_path, _smoke(**changes))), "--out", str(out)])
    assert expected in line
    assert not list(out.glob("stages/*/manifest.json"))


def test_dataset_without_needed_fields(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 8)
    recipe = _smoke(data__sources=[{"name": str(data)}])
    line = _run_bad(capsys, ["run", str(_write(tmp_path, recipe)), "--out", str(tmp_path / "run")])
    assert str(data) in line or "rows.jsonl" in line


def test_unloadable_backbone(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    recipe = _smoke(backbone__name=str(folder))
    line = _run_bad(capsys, ["run", str(_write(tmp_path, recipe)), "--out", str(tmp_path / "run")])
    assert "backbone" in line and str(folder) in line


def test_run_folder_of_another_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"recipe": "someone-else"}')
    before = (out / "run.json").read_text()
    line = _run_bad(capsys, ["run", "tasks/smoke.yaml", "--out", str(out)])
    assert "someone-else" in line
    assert (out / "run.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_check_with_missing_reference(tmp_path, capsys):
    (tmp_path / "report.json").write_text('{"recipe": "x", "rows": []}')
    assert "reference file not found" in _run_bad(capsys, ["check", str(tmp_path), "--reference",
                                                           str(tmp_path / "ref.json")])


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert "not a run folder" in _run_bad(capsys, ["report", str(tmp_path)])
