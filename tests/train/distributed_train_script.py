"""Run by test_train_distributed.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): FFT then MFT on a tiny llama.

Each rank writes ``rank-<r>.json`` with hashes of its final FFT weights, MFT scores and masks, so the test can
check that data-parallel training left both replicas identical.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import fast_arm, losses, state_hash, tiny_dataset, tiny_setup, weights  # noqa: E402

from mft_bench.masking import attach_masks, current_masks, removed_count  # noqa: E402
from mft_bench.recipe import MaskSpec  # noqa: E402
from mft_bench.train import train_fft, train_mft  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    rank = int(os.environ["RANK"])
    model, tokenizer = tiny_setup()
    data, validation = tiny_dataset(32), tiny_dataset(8, seed=1)
    # 32 rows / (4 per batch x 2 ranks) = 4 batches per rank, 2 accumulation steps: 2 optimizer steps per epoch
    fft = train_fft(model, tokenizer, data, validation, *fast_arm(world_size=2, epochs=1.0, save_every=0.5),
                    out / "fft")
    fft_hash = state_hash(weights(fft.model))
    initial, _ = tiny_setup()
    attach_masks(initial, MaskSpec(layers=[2, 3], mask_ratio=0.1))
    initial_masks = current_masks(initial)
    mft = train_mft(fft.model, tokenizer, data, validation, *fast_arm(world_size=2, epochs=2.0, learning_rate=2e-2),
                    MaskSpec(layers=[2, 3], mask_ratio=0.1), out / "mft")
    scores = {n: p for n, p in mft.model.named_parameters() if n.endswith(".scores")}
    report = {
        "rank": rank,
        "world_size": int(os.environ["WORLD_SIZE"]),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "fft_weights": fft_hash,
        "fft_losses": losses(fft.log_history),
        "fft_exports": [s for s, _ in fft.checkpoints],
        "mft_masks": state_hash(mft.masks),
        "mft_scores": state_hash(scores),
        "mft_exports": [s for s, _ in mft.checkpoints],
        "mft_flipped": sum(int((mft.masks[k] != initial_masks[k]).sum()) for k in initial_masks),
        "exact_counts": all(int((~m).sum()) == removed_count(m.numel(), 0.1) for m in mft.masks.values()),
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
