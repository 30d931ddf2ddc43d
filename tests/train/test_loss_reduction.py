"""loss_reduction: the official per-sequence mean loss (sequence) against Trainer's per-token mean (token).

The official finetune.py trains at micro-batch 1 with ``loss = outputs.loss`` (the sequence's mean over its
labelled tokens) and accelerate averages it over the accumulated micro-batches: a step's gradient is the mean
over its sequences of each sequence's own mean. The tests compare the gradient of one optimizer step with that
computed by hand on the same tiny model.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from mft_bench.errors import MftBenchError
from mft_bench.recipe import load_recipe
from mft_bench.train.trainer import ArmTrainer, training_arguments
from train_helpers import fast_arm, tiny_setup

IGNORE = -100


def rows_of_different_lengths() -> Dataset:
    """Four rows whose labelled token counts differ a lot (3 to 30), so the two reductions weigh them differently."""
    g = torch.Generator().manual_seed(5)
    data = {"input_ids": [], "attention_mask": [], "labels": []}
    for length, labelled in ((8, 3), (40, 30), (12, 6), (25, 11)):
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        data["input_ids"].append(ids)
        data["attention_mask"].append([1] * length)
        data["labels"].append([IGNORE] * (length - labelled) + ids[length - labelled:])
    return Dataset.from_dict(data)


class GradientsBeforeStep(TrainerCallback):
    """The accumulated gradients of the first optimizer step (after accumulation, before the update)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trainer_gradients(model, tokenizer, data, tmp_path, *, reduction: str, per_device: int, labelled_logits: bool,
                      world_size: int = 1):
    spec, run = fast_arm(world_size=world_size, max_steps=1, learning_rate=1e-3, per_device_batch_size=per_device,
                         global_batch_size=len(data), max_grad_norm=0.0, loss_reduction=reduction)
    capture = GradientsBeforeStep()
    trainer = ArmTrainer(
        model=model, args=training_arguments(spec, run, tmp_path, has_eval=False), train_dataset=data,
        processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
        callbacks=[capture], loss_reduction=reduction,
    )
    trainer._labelled_logits = None if labelled_logits else False
    trainer.train()
    assert trainer._labelled_logits is labelled_logits  # the path under test was the one taken
    return capture.grads, trainer


def manual_gradients(model, data, *, reduction: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    sums, counts = [], []
    for row in data:
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = labels[0, 1:]
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")
        sums.append(losses.sum())
        counts.append(int((targets != IGNORE).sum()))
    if reduction == "sequence":  # official: each example's outputs.loss, averaged over the accumulation
        loss = torch.stack([s / c for s, c in zip(sums, counts)]).mean()
    else:
        loss = torch.stack(sums).sum() / sum(counts)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("labelled_logits", [True, False])
@pytest.mark.parametrize("per_device", [1, 2])
def test_sequence_reduction_is_the_mean_of_per_sequence_means(tmp_path, labelled_logits, per_device):
    model, tokenizer = tiny_setup()
    data = rows_of_different_lengths()
    expected = manual_gradients(copy.deepcopy(model), data, reduction="sequence")
    grads, _ = trainer_gradients(model, tokenizer, data, tmp_path, reduction="sequence", per_device=per_device,
                                 labelled_logits=labelled_logits)
    assert_same(grads, expected)


def test_token_reduction_unchanged_and_different_from_sequence(tmp_path):
    model, tokenizer = tiny_setup()
    data = rows_of_different_lengths()
    token = manual_gradients(copy.deepcopy(model), data, reduction="token")
    sequence = manual_gradients(copy.deepcopy(model), data, reduction="sequence")
    grads, _ = trainer_gradients(model, tokenizer, data, tmp_path, reduction="token", per_device=1,
                                 labelled_logits=True)
    assert_same(grads, token)
    gap = max(float((token[n] - sequence[n]).abs().max() / sequence[n].abs().max()) for n in token)
    assert gap > 0.05  # rows of 3 and 30 labelled tokens: the reductions weigh them very differently


def test_sequence_evaluation_loss_is_the_mean_over_sequences(tmp_path):
    model, tokenizer = tiny_setup()
    data = rows_of_different_lengths()
    _, trainer = trainer_gradients(model, tokenizer, data, tmp_path, reduction="sequence", per_device=2,
                                   labelled_logits=True)
    model.eval()
    with torch.no_grad():
        means = [float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss)
                 for r in data]
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(sum(means) / len(means), rel=1e-4)


def test_train_fft_uses_the_configured_reduction(tmp_path):
    from mft_bench.train import train_fft

    model, tokenizer = tiny_setup()
    data = rows_of_different_lengths()
    expected = manual_gradients(copy.deepcopy(model), data, reduction="sequence")
    spec, run = fast_arm(max_steps=1, learning_rate=1e-3, per_device_batch_size=1, global_batch_size=len(data),
                         max_grad_norm=0.0, loss_reduction="sequence")
    capture = GradientsBeforeStep()
    train_fft(model, tokenizer, data, None, spec, run, tmp_path, callbacks=[capture])
    assert_same(capture.grads, expected)


def test_unknown_reduction_is_refused():
    smoke = Path(__file__).resolve().parents[2] / "tasks" / "smoke.yaml"
    with pytest.raises(MftBenchError, match="fft.loss_reduction: Input should be 'token' or 'sequence'"):
        load_recipe(smoke, ["fft.loss_reduction=mean"])


@pytest.mark.slow  # two torchrun processes: about a minute on 2 cores
def test_sequence_reduction_averages_over_processes(tmp_path):
    """2 ranks x 2 micro-batches of 1 row: every rank ends the step with the mean over all 4 sequences."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend: cannot run 2 CPU processes")
    script = Path(__file__).with_name("distributed_loss_script.py")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not run 2 local processes with torchrun: {exc}")
    assert done.returncode == 0, done.stderr[-4000:]
    model, _ = tiny_setup()
    expected = manual_gradients(model, rows_of_different_lengths(), reduction="sequence")
    for rank in (0, 1):
        assert_same(torch.load(tmp_path / f"grads-{rank}.pt"), expected)
