"""The pipeline's data stage honours data.selection official and data.chat_template tulu; the arms get
loss_reduction; the paper recipes say all three."""

import json
from pathlib import Path

import datasets
import pytest

from mft_bench.backbone import byte_tokenizer
from mft_bench.recipe import load_recipe, validate_recipe
from mft_bench.stage_models import ModelCache
from mft_bench.stage_runners import run_data_stage
from mft_bench.stages import build_plan

ROOT = Path(__file__).resolve().parent.parent
PAPER_RECIPES = sorted((ROOT / "tasks" / "paper").glob("*.yaml"))


def _recipe(source: Path, **data) -> dict:
    return {
        "name": "official", "backbone": {"name": "tiny:llama"},
        "data": {"sources": [{"name": str(source), "rows": 8}], "validation_rows": 3, "max_length": 128, **data},
        "arms": ["fft"], "mask": {"layers": [0]},
        "fft": {"global_batch_size": 2, "per_device_batch_size": 1, "loss_reduction": "sequence"},
        "evaluation": {"benchmarks": [{"name": "synthetic_math"}]},
    }


def test_data_stage_writes_the_official_rows_in_the_tulu_format(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                              for i in range(30)))
    recipe = validate_recipe(_recipe(source, selection="official", chat_template="tulu"))
    stage = next(s for s in build_plan(recipe, tmp_path / "run") if s.name == "data")
    counts = run_data_stage(recipe, stage, {}, ModelCache(recipe))["counts"]
    assert counts["train"]["rows"] == 8 and counts["validation"]["rows"] == 3
    official = datasets.Dataset.from_json(str(source)).shuffle(seed=42)["messages"][:11]
    tok = byte_tokenizer()
    for split, rows in (("train", official[:8]), ("validation", official[8:])):
        saved = datasets.load_from_disk(str(stage.folder / split))
        texts = [tok.decode(ids) for ids in saved["input_ids"]]
        assert texts == [f"<|user|>\n{m[0]['content']}\n<|assistant|>\n{m[1]['content']}<|endoftext|>" for m in rows]
    assert recipe.train_spec("fft").loss_reduction == "sequence"  # what train_fft reads


def test_defaults_keep_todays_behaviour(tmp_path):
    recipe = validate_recipe(_recipe(tmp_path / "unused.jsonl"))
    assert (recipe.data.selection, recipe.data.chat_template) == ("seeded", "tokenizer")
    assert recipe.mft.loss_reduction == recipe.lora.loss_reduction == "token"
    for name in ("default", "smoke"):
        shipped = load_recipe(ROOT / "tasks" / f"{name}.yaml")
        assert (shipped.data.selection, shipped.data.chat_template) == ("seeded", "tokenizer")
        assert {getattr(shipped, arm).loss_reduction for arm in ("fft", "mft", "lora")} == {"token"}


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipes_train_as_the_official_code(path):
    recipe = load_recipe(path)
    assert (recipe.data.selection, recipe.data.chat_template) == ("official", "tulu")
    assert {getattr(recipe, arm).loss_reduction for arm in ("fft", "mft", "lora")} == {"sequence"}
    assert not any(getattr(recipe, arm).group_by_length for arm in ("fft", "mft", "lora"))  # official: shuffled
    assert all(source.rows for source in recipe.data.sources)  # the official counts: validation comes beyond them


@pytest.mark.parametrize("change, message", [
    ({"data": {"selection": "random"}}, "data.selection: Input should be 'seeded' or 'official'"),
    ({"data": {"chat_template": "llama3"}}, "data.chat_template: Input should be 'tokenizer' or 'tulu'"),
    ({"fft": {"loss_reduction": "mean"}}, "fft.loss_reduction: Input should be 'token' or 'sequence'"),
])
def test_bad_values_are_one_line_errors(tmp_path, change, message):
    from mft_bench.errors import MftBenchError

    data = _recipe(tmp_path / "unused.jsonl")
    for section, values in change.items():
        data[section] = {**data[section], **values}
    with pytest.raises(MftBenchError) as error:
        validate_recipe(data)
    assert message in str(error.value) and "\n" not in str(error.value)
