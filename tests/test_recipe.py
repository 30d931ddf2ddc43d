"""Every shipped recipe validates; overrides; hashing."""

from pathlib import Path

import pytest
import yaml

from mft_bench.errors import MftBenchError
from mft_bench.recipe import apply_overrides, load_recipe, parse_override
from mft_bench.sweep import is_sweep_file, load_sweep

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "tasks").rglob("*.yaml") if "accelerate" not in p.parts and "lm_eval" not in p.parts)
SWEEPS = [p for p in SHIPPED if is_sweep_file(yaml.safe_load(p.read_text()))]
RECIPES = [p for p in SHIPPED if p not in SWEEPS]


def test_recipes_are_shipped():
    names = {p.relative_to(ROOT / "tasks").with_suffix("").as_posix() for p in RECIPES}
    assert {"default", "smoke"} <= names
    for backbone in ("llama2-7b", "llama3.1-8b"):
        for domain in ("math", "coding", "instruction"):
            assert f"paper/{backbone}-{domain}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.arms and recipe.evaluation.benchmarks
    assert 0 < recipe.mask.mask_ratio < 1


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweep_validates_with_every_variant(path):
    sweep = load_sweep(path)  # the base recipe and every variant's recipe are validated
    assert sweep.name == path.stem
    assert len(sweep.variants) > 1 and all(values for values in sweep.axes.values())


def test_sweeps_are_shipped():
    names = {p.relative_to(ROOT / "tasks").with_suffix("").as_posix() for p in SWEEPS}
    assert {"sweeps/smoke-sweep", "paper/ablations/llama2-7b-math"} <= names


@pytest.mark.parametrize("domain,band", [("math", [4, 5, 6, 7]), ("coding", [20, 21, 22, 23]),
                                         ("instruction", [0, 1, 2, 3])])
def test_paper_recipes_use_the_paper_bands(domain, band):
    for backbone in ("llama2-7b", "llama3.1-8b"):
        recipe = load_recipe(ROOT / "tasks" / "paper" / f"{backbone}-{domain}.yaml")
        assert recipe.mask.layers == band
        assert recipe.mask.mask_ratio == 0.1
        assert recipe.fft.learning_rate == 2e-5 and recipe.fft.epochs == 2
        for arm in ("fft", "mft", "lora"):
            spec = getattr(recipe, arm)
            assert spec.global_batch_size == 128 and spec.precision == "mixed"
            # the official 8 GPUs x 1 x 16, and the same 128 rows a step on 1 GPU
            assert spec.accumulation_steps(8) == 16 and spec.accumulation_steps(1) == 128
        assert recipe.backbone.dtype == "bfloat16"


def test_global_batch_is_split_exactly_or_refused(tmp_path):
    spec = load_recipe(ROOT / "tasks" / "smoke.yaml").fft  # global 4, 4 per device
    assert spec.accumulation_steps(1) == 1
    with pytest.raises(MftBenchError, match="global_batch_size 4 cannot be split into per_device_batch_size 4 x 2"):
        spec.accumulation_steps(2)


@pytest.mark.parametrize("key,fix", [("gradient_accumulation_steps", "global_batch_size"), ("bf16", "precision")])
def test_removed_training_keys_name_their_replacement(tmp_path, key, fix):
    text = (ROOT / "tasks" / "smoke.yaml").read_text().replace("warmup_ratio: 0.0}", f"warmup_ratio: 0.0, {key}: 1}}", 1)
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(MftBenchError, match=f"'fft.{key}' was .*{fix}"):
        load_recipe(path)


@pytest.mark.parametrize("override,message", [
    ("mft.strategy=fsdp", "mft.strategy fsdp"),
    ("fft.global_batch_size=6", "not a multiple of per_device_batch_size 4"),
    ("backbone.dtype=float16", None),  # mixed fp16 is fine
    ("mask.start_from=best-test", "set evaluation.checkpoints: all"),
    ("evaluation.test_selected=true", "set evaluation.checkpoints: all"),
    ("mask.start_from=step-0", "start_from"),
    ("mask.start_from=middle", "start_from"),
    ("fft.max_steps=5", None),
])
def test_training_settings_the_recipe_alone_refuses(override, message):
    if message is None:
        load_recipe(ROOT / "tasks" / "smoke.yaml", [override])
        return
    with pytest.raises(MftBenchError, match=message):
        load_recipe(ROOT / "tasks" / "smoke.yaml", [override])


def test_overrides_parse_yaml_values():
    assert parse_override("fft.learning_rate=1e-5") == (["fft", "learning_rate"], 1e-5)
    assert parse_override("mask.layers=[1, 2]") == (["mask", "layers"], [1, 2])
    data = apply_overrides({"data": {"sources": [{"name": "a", "rows": 3}]}}, ["data.sources.0.rows=7", "seed=3"])
    assert data == {"data": {"sources": [{"name": "a", "rows": 7}]}, "seed": 3}


def test_override_changes_hash_and_value():
    base = load_recipe(ROOT / "tasks" / "smoke.yaml")
    changed = load_recipe(ROOT / "tasks" / "smoke.yaml", ["mft.learning_rate=0.5"])
    assert changed.mft.learning_rate == 0.5
    assert base.content_hash() != changed.content_hash()
    assert base.content_hash() == load_recipe(ROOT / "tasks" / "smoke.yaml").content_hash()


def test_bad_override_is_a_user_error():
    with pytest.raises(MftBenchError, match="KEY=VALUE"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["fft.learning_rate"])
    with pytest.raises(MftBenchError, match="no list item 9"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["data.sources.9.rows=1"])


def test_evaluation_sandbox_setting_reaches_the_code_benchmarks(monkeypatch):
    from mft_bench.evaluation import registry
    from mft_bench.recipe import EvaluationSpec

    spec = {"benchmarks": [{"name": "humaneval"}]}
    assert EvaluationSpec(**spec).sandbox == "namespace"
    assert EvaluationSpec(**spec, sandbox="rlimits").sandbox == "rlimits"
    with pytest.raises(ValueError):
        EvaluationSpec(**spec, sandbox="none")
    assert registry.make_benchmark("humaneval", sandbox="rlimits").sandbox == "rlimits"
    assert registry.make_benchmark("humaneval_plain").sandbox == "namespace"
    assert registry.make_benchmark("gsm8k", sandbox="rlimits").name == "gsm8k"  # no code, no sandbox option


def test_best_test_start_needs_the_labelled_test_selection():
    with pytest.raises(MftBenchError, match="test_selected: true"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["evaluation.checkpoints=all", "mask.start_from=best-test"])
    recipe = load_recipe(ROOT / "tasks" / "smoke.yaml", ["evaluation.checkpoints=all", "evaluation.test_selected=true",
                                                          "mask.start_from=best-test", "fft.save_every=0.5"])
    assert recipe.fft.export_count == 2


def test_the_compute_matched_control_has_ffts_update_and_mfts_length():
    recipe = load_recipe(ROOT / "tasks" / "smoke.yaml", ["arms=[pretrained, fft, mft, fft_continued]",
                                                          "mft.epochs=2", "mft.save_every=0.5"])
    control = recipe.train_spec("fft_continued")
    assert (control.learning_rate, control.epochs, control.save_every) == (recipe.fft.learning_rate, 2, 0.5)
    assert control.global_batch_size == recipe.mft.global_batch_size
    with pytest.raises(MftBenchError, match="start from the FFT model"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["arms=[pretrained, fft_continued]"])
