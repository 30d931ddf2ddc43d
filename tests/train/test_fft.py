"""FFT arm on a tiny llama: interval exports, validation loss, seeded reproducibility, kill-and-resume."""

from __future__ import annotations

import pytest
import torch
from train_helpers import StepRecorder, SimulatedKill, fast_arm, kill_after, losses, state_hash, tiny_dataset, tiny_setup, weights

from mft_bench.train import train_fft

# 24 rows, 4 per batch, 2 accumulation steps: 3 optimizer steps per epoch, 6 in all; exports every 2/3 epoch.
CONFIG = dict(save_every=2 / 3)


def _run(out, callbacks=()):
    model, tokenizer = tiny_setup()
    return train_fft(model, tokenizer, tiny_dataset(24), tiny_dataset(8, seed=1), *fast_arm(**CONFIG), out,
                     callbacks=callbacks)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fft")
    straight = _run(base / "straight")
    with pytest.raises(SimulatedKill):
        _run(base / "resumed", callbacks=[kill_after(5)])  # step 5 is lost: the last checkpoint is step 4
    recorder = StepRecorder()
    resumed = _run(base / "resumed", callbacks=[recorder])
    assert recorder.steps == [5, 6]  # resumed from checkpoint-4, mid-epoch (not a fresh run)
    return base, straight, resumed


def test_exports_at_each_interval_and_the_end(runs):
    base, straight, _ = runs
    assert [s for s, _ in straight.checkpoints] == [2, 4, 6]
    assert set(straight.validation_loss) == {2, 4, 6}
    assert all(torch.isfinite(torch.tensor(v)) for v in straight.validation_loss.values())
    for step, folder in straight.checkpoints:
        assert folder == base / "straight" / "exports" / f"step-{step}"
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert (folder / "tokenizer.json").is_file() and not (folder / "training_args.bin").exists()
    # Trainer's resume checkpoints are pruned; the exports are what evaluation reads
    assert len(list((base / "straight").glob("checkpoint-*"))) <= 2


def test_final_export_is_the_trained_model(runs):
    from transformers import AutoModelForCausalLM

    _, straight, _ = runs
    loaded = AutoModelForCausalLM.from_pretrained(straight.checkpoints[-1][1])
    assert state_hash(weights(loaded)) == state_hash(weights(straight.model))
    initial, _ = tiny_setup()
    changed = [k for k, v in weights(initial).items() if not torch.equal(v, weights(straight.model)[k])]
    assert "model.embed_tokens.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed


def test_loss_logged_every_step_and_finite(runs):
    _, straight, _ = runs
    curve = losses(straight.log_history)
    assert [s for s, _ in curve] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in curve)


def test_killed_run_resumes_to_identical_weights_and_curve(runs):
    base, straight, resumed = runs
    assert losses(resumed.log_history) == losses(straight.log_history)
    assert resumed.validation_loss == straight.validation_loss
    assert state_hash(weights(resumed.model)) == state_hash(weights(straight.model))
    from safetensors.torch import load_file

    for (s1, f1), (s2, f2) in zip(straight.checkpoints, resumed.checkpoints, strict=True):
        assert s1 == s2 and state_hash(load_file(f1 / "model.safetensors")) == state_hash(load_file(f2 / "model.safetensors"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    model_a, tokenizer = tiny_setup()
    model_b, _ = tiny_setup()
    config = dict(max_steps=2, group_by_length=False)
    plain = train_fft(model_a, tokenizer, tiny_dataset(16), None, *fast_arm(**config), tmp_path / "plain")
    checkpointed = train_fft(model_b, tokenizer, tiny_dataset(16), None,
                             *fast_arm(gradient_checkpointing=True, **config), tmp_path / "gc")
    assert checkpointed.model.is_activation_checkpointing
    after_plain, after_gc = weights(plain.model), weights(checkpointed.model)
    for name, value in after_plain.items():
        torch.testing.assert_close(after_gc[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_only_at_labelled_positions_give_the_same_loss_and_gradients(arch):
    from peft import LoraConfig, get_peft_model

    from mft_bench.train.trainer import labelled_logits_only, supports_labelled_logits

    model, _ = tiny_setup(arch)
    model.eval()  # no dropout: the two forwards must see the same network
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[0, :11] = -100  # a longer prompt
    labels[2, 15:] = -100  # right padding
    assert supports_labelled_logits(model)
    inputs = {"input_ids": ids, "labels": labels}
    sliced = labelled_logits_only(inputs)
    n_labelled = int((labels[:, 1:] != -100).sum())
    full_out, sliced_out = model(**inputs), model(**sliced)
    assert sliced_out.logits.shape[0] == n_labelled  # one row of logits per labelled token, no more
    torch.testing.assert_close(sliced_out.loss, full_out.loss)
    full_grads = torch.autograd.grad(full_out.loss, list(model.parameters()), allow_unused=True)
    sliced_grads = torch.autograd.grad(sliced_out.loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(full_grads, sliced_grads):
        if a is not None:
            torch.testing.assert_close(a, b)
    assert labelled_logits_only({"input_ids": ids}) == {"input_ids": ids}  # nothing to do without labels
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"] if arch == "gpt2" else ["q_proj"]))
    assert supports_labelled_logits(lora)
    torch.testing.assert_close(lora(**sliced).loss, lora(**inputs).loss)


def test_a_finished_arm_holds_no_optimizer_or_wrapped_model(tmp_path):
    """What training allocated beyond the model (AdamW states, the wrapped model, the accelerator's references)
    is freed when the arm returns, so the next stage starts with that memory back."""
    import gc
    import weakref

    from transformers import TrainerCallback

    held = {}

    class _Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            held["optimizer"] = weakref.ref(optimizer)

    gc.collect()
    gc.disable()  # freed when the arm returns, not whenever the cycle collector next runs
    try:
        result = _run(tmp_path, callbacks=[_Watch()])
        assert held["optimizer"]() is None
    finally:
        gc.enable()
    assert result.model is not None and not any(p.grad is not None for p in result.model.parameters())
