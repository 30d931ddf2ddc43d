"""Training-arm plumbing without training: settings validation, step schedule, resume lookup, data order,
TrainingArguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from train_helpers import fast_arm

from mft_bench.errors import MftBenchError
from mft_bench.recipe import LoraSpec, TrainSpec, load_recipe
from mft_bench.train import RunContext
from mft_bench.train.lora import SEVEN_PROJECTIONS, default_target_modules
from mft_bench.train.sampling import EpochSeededLengthGroupedSampler
from mft_bench.train.strategy import fsdp_arguments, refuse_launcher_strategy, resolve_strategy
from mft_bench.train.trainer import (
    export_steps,
    last_checkpoint,
    training_arguments,
    updates_per_epoch,
)



SMOKE = Path(__file__).resolve().parents[2] / "tasks" / "smoke.yaml"


def test_defaults_are_the_papers():
    c = TrainSpec()
    assert (c.learning_rate, c.lr_scheduler, c.warmup_ratio, c.weight_decay, c.epochs) == (2e-5, "linear", 0.03, 0.0, 2.0)
    assert c.global_batch_size == 128 and c.per_device_batch_size * c.accumulation_steps(1) == 128
    assert c.accumulation_steps(8) == 16  # the paper's 8 GPUs x 1 x 16
    lora = LoraSpec()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (64, 16, 0.1, None)


@pytest.mark.parametrize("override", ["warmup_ratio=1.5", "save_every=0.0", "lr_scheduler=nope", "max_steps=0",
                                      "per_device_batch_size=0", "learning_rate=-1.0", "precision=bf16"])
@pytest.mark.parametrize("arm", ["fft", "lora"])
def test_bad_setting_is_one_line_naming_the_field(arm, override):
    with pytest.raises(MftBenchError) as info:
        load_recipe(SMOKE, [f"{arm}.{override}"])
    line = str(info.value)
    assert "\n" not in line and f"{arm}.{override.split('=')[0]}" in line


def test_settings_that_fail_together_are_refused_when_the_recipe_loads():
    with pytest.raises(MftBenchError, match=r"mft: save_every is a fraction of an epoch .*got 3.0 for 1 epoch"):
        load_recipe(SMOKE, ["mft.save_every=3"])  # more than the epochs trained: no export would fall inside
    with pytest.raises(MftBenchError, match="fft.*with max_steps leave it null"):
        load_recipe(SMOKE, ["fft.max_steps=5", "fft.save_every=0.5"])
    with pytest.raises(MftBenchError, match="mask.modules"):
        load_recipe(SMOKE, ["mask.modules=[]"])
    with pytest.raises(MftBenchError, match="lora.target_modules"):
        load_recipe(SMOKE, ["lora.target_modules=[]"])


def test_run_context_takes_only_a_resolved_strategy():
    with pytest.raises(ValueError, match="resolve_strategy"):
        RunContext(seed=0, gradient_accumulation_steps=1, compute_dtype="float32", strategy="auto")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        RunContext(seed=0, gradient_accumulation_steps=0, compute_dtype="float32", strategy="ddp")


def test_step_schedule_matches_trainer_counting():
    assert updates_per_epoch(24, 4, 2, 1) == 3  # 6 batches / 2
    assert updates_per_epoch(25, 4, 2, 1) == 4  # 7 batches -> last step takes one
    assert updates_per_epoch(24, 4, 2, 2) == 2  # 6 batches over 2 ranks: 3 each -> 2 steps
    assert updates_per_epoch(3, 4, 32, 1) == 1
    # the paper's save_every 1/3 over 2 epochs: 6 exports, evenly spaced, the last at the end
    assert TrainSpec(epochs=2, save_every=0.3333).export_count == 6 and TrainSpec().export_count == 1
    assert export_steps(6, 938) == [156, 313, 469, 625, 782, 938]
    assert export_steps(3, 6) == [2, 4, 6] and export_steps(1, 7) == [7]
    assert export_steps(4, 2) == [1, 1, 2, 2]  # fewer steps than exports: they share steps
    with pytest.raises(ValidationError, match="max_steps"):
        TrainSpec(max_steps=5, save_every=0.5)


def test_last_checkpoint_skips_incomplete_and_damaged_ones(tmp_path, caplog):
    import json

    from mft_bench.train.callbacks import SEAL

    assert last_checkpoint(tmp_path / "missing") is None
    for step in (2, 4, 10):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        (folder / "optimizer.pt").write_bytes(b"x" * 64)
    for step in (2, 4):  # sealed once every file was saved; checkpoint-10 was being written when the process died
        folder = tmp_path / f"checkpoint-{step}"
        (folder / SEAL).write_text(json.dumps({"trainer_state.json": 2, "optimizer.pt": 64}))
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"x" * 10)  # truncated later
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "not resuming from checkpoint-4: optimizer.pt has 10 bytes, not 64" in caplog.text
    (tmp_path / "checkpoint-2" / "optimizer.pt").unlink()
    assert last_checkpoint(tmp_path) is None


def test_length_grouped_order_depends_only_on_seed_and_epoch():
    lengths = [5, 40, 7, 33, 12, 9, 28, 3, 17, 21, 30, 2] * 4
    a = EpochSeededLengthGroupedSampler(lengths, batch_size=4, seed=0)
    b = EpochSeededLengthGroupedSampler(lengths, batch_size=4, seed=0)
    first = list(a)
    list(b)  # consuming b (or any global RNG) must not change a later epoch's order
    a.set_epoch(1), b.set_epoch(1)
    assert list(a) == list(b) != first
    assert sorted(first) == list(range(len(lengths)))
    a.set_epoch(0)
    assert list(a) == first


def test_training_arguments_carry_the_settings_and_the_run(tmp_path):
    spec, run = fast_arm(world_size=2, seed=7, gradient_checkpointing=True, weight_decay=0.1, group_by_length=False,
                         warmup_ratio=0.03)
    args = training_arguments(spec, run, tmp_path, has_eval=True)
    assert args.warmup_steps == 0.03 and args.weight_decay == 0.1 and args.train_sampling_strategy == "random"
    assert (args.seed, args.data_seed, args.gradient_accumulation_steps) == (7, 7, 2)  # 16 rows: 4 a batch x 2 procs
    assert args.per_device_train_batch_size == spec.per_device_batch_size == 4
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.eval_strategy == "steps" and args.report_to in ("none", ["none"], [])
    assert args.remove_unused_columns is False and args.prediction_loss_only
    mft_args = training_arguments(spec, run, tmp_path, has_eval=False, weight_decay=0.0, activation_checkpointing=False)
    assert mft_args.weight_decay == 0.0 and not mft_args.activation_checkpointing and mft_args.eval_strategy == "no"


def test_training_arguments_autocast_in_the_compute_dtype(tmp_path):
    fp32 = training_arguments(*fast_arm(), tmp_path, has_eval=False)
    bf16 = training_arguments(*fast_arm(compute_dtype="bfloat16"), tmp_path, has_eval=False)
    fp16 = training_arguments(*fast_arm(compute_dtype="float16", precision="mixed"), tmp_path, has_eval=False)
    assert (fp32.bf16, fp32.fp16, bf16.bf16, bf16.fp16, fp16.fp16) == (False, False, True, False, True)


def test_strategy_auto_shards_fft_only_when_a_replica_does_not_fit():
    gib = 2**30
    assert resolve_strategy("fft", "auto", world_size=8, replica_bytes=120 * gib, device_bytes=80 * gib) == "fsdp"
    assert resolve_strategy("fft", "auto", world_size=8, replica_bytes=60 * gib, device_bytes=80 * gib) == "ddp"
    assert resolve_strategy("fft", "auto", world_size=1, replica_bytes=120 * gib, device_bytes=80 * gib) == "ddp"
    assert resolve_strategy("fft", "auto", world_size=8, replica_bytes=None, device_bytes=80 * gib) == "ddp"
    assert resolve_strategy("mft", "auto", world_size=8, replica_bytes=120 * gib, device_bytes=80 * gib) == "ddp"
    assert resolve_strategy("fft", "fsdp", world_size=2, replica_bytes=None, device_bytes=None) == "fsdp"
    with pytest.raises(MftBenchError, match="only full fine-tuning can shard"):
        resolve_strategy("lora", "fsdp", world_size=2, replica_bytes=None, device_bytes=None)


def test_fsdp_shards_by_decoder_layer_with_its_own_checkpointing(tmp_path):
    from mft_bench.backbone import tiny_model

    model = tiny_model("llama", num_layers=1)
    settings = fsdp_arguments(model, activation_checkpointing=True)
    assert settings["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert settings["fsdp_config"]["version"] == 2 and settings["fsdp_config"]["activation_checkpointing"]
    args = training_arguments(*fast_arm(strategy="fsdp", gradient_checkpointing=True), tmp_path, has_eval=False,
                              model=model)
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["activation_checkpointing"]
    assert not args.activation_checkpointing  # the Trainer's own would gather every layer's weights again


def test_a_sharding_accelerate_launch_is_refused(monkeypatch):
    refuse_launcher_strategy()  # plain launch: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(MftBenchError, match="--nproc"):
        refuse_launcher_strategy()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(MftBenchError, match="ACCELERATE_USE_DEEPSPEED"):
        refuse_launcher_strategy()


def test_lora_targets_the_seven_projections_when_present():
    from mft_bench.backbone import tiny_model

    assert default_target_modules(tiny_model("llama", num_layers=1)) == list(SEVEN_PROJECTIONS)
    assert default_target_modules(tiny_model("gpt2", num_layers=1)) == "all-linear"


def test_gguf_quantizer_released_other_quantization_refused():
    from types import SimpleNamespace

    from mft_bench.backbone import tiny_model
    from mft_bench.backbone import release_gguf_quantizer

    removed = []
    model = tiny_model("llama", num_layers=1)
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"),
                                         remove_quantization_config=removed.append)
    release_gguf_quantizer(model, "fft")
    assert removed == [model]  # dense already: the quantizer is dropped
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    with pytest.raises(MftBenchError, match="quantized"):
        release_gguf_quantizer(model, "mft")
    release_gguf_quantizer(model, "lora", allow_quantized=True)  # QLoRA-style training stays possible


def test_an_arm_that_cannot_fit_one_gpu_is_refused_before_anything_runs():
    from pathlib import Path

    from mft_bench.translate import refuse_what_cannot_fit
    from mft_bench.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "tasks" / "paper" / "llama2-7b-math.yaml")
    gib = 2**30
    with pytest.raises(MftBenchError, match=r"fft needs about \d+ GiB per GPU.*--nproc N.*FSDP"):
        refuse_what_cannot_fit(recipe, "fft", "ddp", 1, 80 * gib)  # mixed-precision 7B FFT on one 80 GB card
    refuse_what_cannot_fit(recipe, "fft", "ddp", 1, 141 * gib)  # an H200 holds it (the estimate's margin)
    refuse_what_cannot_fit(recipe, "fft", "fsdp", 8, 80 * gib)  # sharded: the plan's per-GPU numbers apply
    refuse_what_cannot_fit(recipe, "mft", "ddp", 1, 80 * gib)
