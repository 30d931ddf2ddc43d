"""LoRA arm (peft, paper setting r=64, alpha=16, dropout 0.1, the 7 projections) on a tiny llama."""

from __future__ import annotations

import pytest
import torch
from train_helpers import (
    SimulatedKill,
    StepRecorder,
    fast_arm,
    kill_after,
    losses,
    state_hash,
    tiny_dataset,
    tiny_setup,
    weights,
)

from mft_bench.recipe import LoraSpec
from mft_bench.train import train_lora
from mft_bench.train.lora import lora_config


def _run(out, callbacks=()):
    model, tokenizer = tiny_setup()
    return train_lora(model, tokenizer, tiny_dataset(24), tiny_dataset(8, seed=1),
                      *fast_arm(LoraSpec, save_every=2 / 3), out, callbacks=callbacks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lora")
    straight = _run(base / "straight")
    with pytest.raises(SimulatedKill):
        _run(base / "resumed", callbacks=[kill_after(5)])
    recorder = StepRecorder()
    resumed = _run(base / "resumed", callbacks=[recorder])
    assert recorder.steps == [5, 6]
    return base, straight, resumed


def test_paper_setting_on_the_seven_projections():
    model, _ = tiny_setup()
    config = lora_config(model, LoraSpec())
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_result_is_a_merged_dense_model(runs):
    _, straight, _ = runs
    keys = set(weights(straight.model))
    assert not any("lora" in k for k in keys) and "model.layers.0.self_attn.q_proj.weight" in keys
    base, _ = tiny_setup()
    assert keys == set(weights(base))
    before, after = weights(base), weights(straight.model)
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # not adapted


def test_exports_are_merged_folders(runs):
    from transformers import AutoModelForCausalLM

    _, straight, _ = runs
    assert [s for s, _ in straight.checkpoints] == [2, 4, 6] and set(straight.validation_loss) == {2, 4, 6}
    assert not (straight.checkpoints[-1][1] / "adapter_config.json").exists()
    final = AutoModelForCausalLM.from_pretrained(straight.checkpoints[-1][1])
    assert state_hash(weights(final)) == state_hash(weights(straight.model))


def test_killed_run_resumes_identically_despite_dropout(runs):
    _, straight, resumed = runs
    assert losses(resumed.log_history) == losses(straight.log_history)
    assert state_hash(weights(resumed.model)) == state_hash(weights(straight.model))
