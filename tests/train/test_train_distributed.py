"""Data-parallel training on 2 CPU processes (torchrun, gloo): FFT then MFT leave both replicas identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # two torchrun processes training FFT then MFT

SCRIPT = Path(__file__).with_name("distributed_train_script.py")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend: cannot run 2 CPU processes")
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(out)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not run 2 local processes with torchrun: {exc}")
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_both_ranks_trained_together(reports):
    assert [r["world_size"] for r in reports] == [2, 2] and [r["backend"] for r in reports] == ["gloo", "gloo"]
    # 32 rows split over 2 ranks: 2 optimizer steps per epoch (4 if each rank had trained alone on all rows)
    assert [s for s, _ in reports[0]["fft_losses"]] == [1, 2]
    assert reports[0]["fft_exports"] == [1, 2] and reports[0]["mft_exports"] == [4]


def test_fft_replicas_identical(reports):
    assert reports[0]["fft_weights"] == reports[1]["fft_weights"]
    assert reports[0]["fft_losses"] == reports[1]["fft_losses"]


def test_mft_masks_identical_on_both_ranks(reports):
    assert reports[0]["mft_masks"] == reports[1]["mft_masks"]
    assert reports[0]["mft_scores"] == reports[1]["mft_scores"]
    assert all(r["exact_counts"] for r in reports)
    assert reports[0]["mft_flipped"] > 0  # the masks did train
