"""Run by test_train_loss_reduction.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): one optimizer step of
the sequence reduction on 4 rows (1 per micro-batch, 2 micro-batches per rank); each rank saves its gradients."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loss_reduction import rows_of_different_lengths, trainer_gradients  # noqa: E402
from train_helpers import tiny_setup  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model, tokenizer = tiny_setup()
    grads, trainer = trainer_gradients(model, tokenizer, rows_of_different_lengths(), out / "train",
                                       reduction="sequence", per_device=1, labelled_logits=True, world_size=2)
    assert trainer.args.world_size == 2 and trainer.args.gradient_accumulation_steps == 2
    torch.save(grads, out / f"grads-{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
