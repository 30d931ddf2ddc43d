"""FFT then MFT for a few steps on the real SmolLM2-135M-Instruct backbone, 16 GSM8K rows (offline copy)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
logger = logging.getLogger(__name__)


def _tokens_per_second(log_history: list[dict]) -> float:
    final = [e for e in log_history if "train_runtime" in e and "num_input_tokens_seen" in e][-1]
    return final["num_input_tokens_seen"] / final["train_runtime"]


@pytest.mark.slow
def test_fft_then_mft_on_smollm2(tmp_path):
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not present (offline GSM8K copy)")
    pytest.importorskip("gguf")
    from mft_bench.backbone import load_backbone
    from mft_bench.data import tokenize_conversations
    from mft_bench.data.converters import to_messages
    from mft_bench.masking import removed_count
    from mft_bench.recipe import MaskSpec
    from mft_bench.train import train_fft, train_mft
    from train_helpers import fast_arm

    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:20]]
    model, tokenizer = load_backbone("smollm2-135m")
    conversations = [to_messages(row, "gsm8k") for row in rows]
    train = tokenize_conversations(conversations[:16], tokenizer, max_length=256)
    validation = tokenize_conversations(conversations[16:], tokenizer, max_length=256)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "layers.3." in k}

    config = dict(max_steps=3, per_device_batch_size=4, global_batch_size=4, warmup_ratio=0.0)
    started = time.perf_counter()
    fft = train_fft(model, tokenizer, train, validation, *fast_arm(learning_rate=2e-5, **config), tmp_path / "fft")
    fft_seconds = time.perf_counter() - started
    fft_losses = [e["loss"] for e in fft.log_history if "loss" in e]
    assert len(fft_losses) == 3 and all(math.isfinite(v) for v in fft_losses)
    assert [s for s, _ in fft.checkpoints] == [3] and math.isfinite(fft.validation_loss[3])
    fft_weights = {k: v.clone() for k, v in fft.model.state_dict().items()}
    assert not torch.equal(fft_weights["model.layers.3.mlp.down_proj.weight"],
                           frozen_before["model.layers.3.mlp.down_proj.weight"])

    spec = MaskSpec(layers=[4, 5, 6, 7], mask_ratio=0.1)  # the paper's math band
    started = time.perf_counter()
    mft = train_mft(fft.model, tokenizer, train, validation, *fast_arm(learning_rate=1e-3, **config), spec,
                    tmp_path / "mft")
    mft_seconds = time.perf_counter() - started
    mft_losses = [e["loss"] for e in mft.log_history if "loss" in e]
    assert len(mft_losses) == 3 and all(math.isfinite(v) for v in mft_losses)
    assert len(mft.masks) == 28  # 7 projections x 4 layers
    for name, mask in mft.masks.items():
        assert int((~mask).sum()) == removed_count(mask.numel(), 0.1), name
    after = mft.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fft_weights.items())  # MFT never touches a weight
    assert mft.checkpoints[-1][1].name == "masks-step-3.safetensors"

    logger.warning("SmolLM2-135M, 3 steps x 4 rows: FFT %.1f s (%.0f tok/s), MFT %.1f s (%.0f tok/s)",
                   fft_seconds, _tokens_per_second(fft.log_history), mft_seconds,
                   _tokens_per_second(mft.log_history))
