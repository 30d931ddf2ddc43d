"""How a training arm spreads over processes: ``ddp`` (a whole replica per process) or ``fsdp`` (FSDP2: weights,
gradients and optimizer state sharded per decoder layer).

The strategy is chosen per arm, so one launch trains FFT sharded and MFT / LoRA replicated (their masks and merged
adapters need whole weights). Both go through ``transformers.Trainer`` and accelerate: FSDP is switched on per
Trainer with ``TrainingArguments(fsdp=True, fsdp_config=...)``, and each new ``TrainingArguments`` resets
accelerate's process-wide state, so consecutive arms in one process can differ.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

from mft_bench.arms import shardable_arms
from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

# accelerate launch --config_file <fsdp|deepspeed>.yaml sets these for every Accelerator of the process, which
# would shard MFT and LoRA too; mft-bench chooses each arm's strategy itself.
LAUNCHER_STRATEGY_VARIABLES = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
# full fine-tuning (and its compute-matched continuation) may shard; MFT and LoRA read whole weights (arms.Arm)
SHARDABLE_ARMS = shardable_arms()


def resolve_strategy(arm: str, requested: str, *, world_size: int, replica_bytes: int | None,
                     device_bytes: int | None) -> str:
    """The strategy an arm trains with: ``requested`` unless it is ``auto``, which shards FFT only when there are
    several processes and a whole replica (weights, gradients, optimizer state, activations) would not fit one
    device. Unknown sizes count as fitting."""
    if requested not in ("auto", "ddp", "fsdp"):
        raise MftBenchError(f"{arm}.strategy must be auto, ddp or fsdp, got {requested!r}")
    if requested == "fsdp" and arm not in SHARDABLE_ARMS:
        raise MftBenchError(f"{arm}.strategy fsdp: only full fine-tuning can shard its weights; use ddp or auto")
    if requested != "auto":
        return requested
    too_big = bool(replica_bytes and device_bytes and replica_bytes > device_bytes)
    return "fsdp" if arm in SHARDABLE_ARMS and world_size > 1 and too_big else "ddp"


def refuse_launcher_strategy() -> None:
    """An accelerate launch configured for FSDP or DeepSpeed would apply it to every arm: refuse it in one line."""
    for name in LAUNCHER_STRATEGY_VARIABLES:
        if os.environ.get(name, "").lower() == "true":
            raise MftBenchError(
                f"launched with {name}=true (an accelerate FSDP/DeepSpeed config), which would shard every arm; "
                "mft-bench picks each arm's strategy (train.strategy): launch with `mft-bench run RECIPE --nproc N`, "
                "torchrun, or `accelerate launch --num_processes N` without a sharding config"
            )


def fsdp_arguments(model: Any, *, activation_checkpointing: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords that shard ``model`` with FSDP2, one unit per decoder layer.

    Resume checkpoints are sharded (each process writes its own part); the evaluable exports gather the whole
    state dict (see ``fft.DenseExporter``). Activation checkpointing is FSDP's own: the Trainer's would gather
    every layer's weights once more in the backward pass.
    """
    layers = list(getattr(model, "_no_split_modules", None) or [])
    if not layers:
        raise MftBenchError(
            f"fsdp: {type(model).__name__} does not name its decoder layer class (_no_split_modules); use strategy ddp"
        )
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": layers,
            "state_dict_type": "SHARDED_STATE_DICT",
            "reshard_after_forward": True,
            "activation_checkpointing": activation_checkpointing,
        },
    }


@contextlib.contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """Let accelerate run FSDP2 on CPU processes (gloo), for the tests and CPU-only machines.

    accelerate enables FSDP only for accelerator devices (its list of distributed types leaves out MULTI_CPU), and
    every ``AcceleratorState()`` re-copies the process-level type. While this is active, an AcceleratorState that
    holds an FSDP plugin on CPU processes reports FSDP. torch's FSDP2 itself runs on CPU with gloo.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:  # the configuring call
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
        if self.__dict__.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
