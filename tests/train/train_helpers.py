"""Shared pieces of the training-arm tests (and the distributed script): tiny model, tiny data, fast settings."""

from __future__ import annotations

import hashlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from mft_bench.backbone import byte_tokenizer, tiny_model  # noqa: E402
from mft_bench.recipe import TrainSpec  # noqa: E402
from mft_bench.train import RunContext  # noqa: E402


def tiny_setup(arch: str = "llama", num_layers: int = 4, seed: int = 0):
    tokenizer = byte_tokenizer()
    return tiny_model(arch, vocab_size=len(tokenizer), num_layers=num_layers, seed=seed), tokenizer


def tiny_dataset(n: int = 24, *, seed: int = 0, min_len: int = 6, max_len: int = 24) -> Dataset:
    """Random byte sequences of varied length; the first third of each is prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        prompt = length // 3
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict(rows)


def fast_arm(spec_class: type[TrainSpec] = TrainSpec, *, world_size: int = 1, seed: int = 0,
             compute_dtype: str = "float32", strategy: str = "ddp", **overrides) -> tuple[TrainSpec, RunContext]:
    """The settings of a few quick optimizer steps with a learning rate large enough to move a tiny model (and its
    masks), as a recipe gives them (``spec_class``: ``TrainSpec``, or ``LoraSpec`` with the adapter settings in
    ``overrides``), and the run's context on ``world_size`` processes as the pipeline derives it. The one place the
    tests' training defaults live; pass both to an arm: ``train_fft(model, tokenizer, data, None, *fast_arm(), out)``.
    """
    settings = dict(epochs=2.0, learning_rate=5e-3, warmup_ratio=0.0, per_device_batch_size=4,
                    global_batch_size=8 * world_size)
    settings.update(overrides)
    spec = spec_class(**settings)
    return spec, RunContext(seed=seed, gradient_accumulation_steps=spec.accumulation_steps(world_size),
                            compute_dtype=compute_dtype, strategy=strategy)


def losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e]


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SimulatedKill(RuntimeError):
    """Stands in for a killed process: raised inside training, after an optimizer step, before its save."""


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedKill(f"killed after step {self.step}")


def kill_after(step: int) -> KillAfterStep:
    return KillAfterStep(step)


class StepRecorder(TrainerCallback):
    """Records the global steps one call trained (proves a resume skipped the finished ones)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
