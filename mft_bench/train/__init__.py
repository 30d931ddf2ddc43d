"""Training arms on transformers.Trainer: fft (all weights), mft (mask scores only, from FFT), lora (peft).

Each arm takes the recipe's settings (``recipe.TrainSpec``; ``recipe.LoraSpec`` for LoRA, ``recipe.MaskSpec``
for MFT's masks) and the run's ``RunContext``.

Multi-device: launch the CLI through accelerate with one of ``tasks/accelerate/*.yaml``, e.g.
``accelerate launch --config_file tasks/accelerate/deepspeed_zero3.yaml -m mft_bench.cli run <recipe>``.
"""

from mft_bench.train.context import RunContext, TrainResult
from mft_bench.train.fft import train_fft
from mft_bench.train.lora import train_lora
from mft_bench.train.mft import train_mft

__all__ = ["RunContext", "TrainResult", "train_fft", "train_lora", "train_mft"]
