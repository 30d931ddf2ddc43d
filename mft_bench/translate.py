"""What a training stage needs beside the recipe's own settings: the arm's ``RunContext`` on N processes (seed,
accumulation, compute dtype, resolved strategy) and its estimated memory per process (and the refusal of what
cannot fit)."""

from __future__ import annotations

from mft_bench.errors import MftBenchError
from mft_bench.recipe import Recipe


def run_context(recipe: Recipe, arm: str, world_size: int, device_bytes: int | None = None):
    """The ``RunContext`` the arm trains with beside its ``recipe.train_spec(arm)`` on ``world_size`` processes:
    accumulation from the global batch (refused when it cannot be made exactly), strategy resolved, compute dtype
    = the backbone's, the recipe's seed."""
    from mft_bench.train import RunContext
    from mft_bench.train.strategy import SHARDABLE_ARMS, resolve_strategy

    spec = recipe.train_spec(arm)
    needs_size = spec.strategy == "auto" and arm in SHARDABLE_ARMS and world_size > 1 and device_bytes
    strategy = resolve_strategy(arm, spec.strategy, world_size=world_size,
                                replica_bytes=replica_bytes(recipe, arm, world_size) if needs_size else None,
                                device_bytes=device_bytes)
    return RunContext(seed=recipe.seed, gradient_accumulation_steps=spec.accumulation_steps(world_size),
                      compute_dtype=recipe.backbone.dtype, strategy=strategy)


# the cost model is within ~25% of the measured H200 anchors: refuse only what exceeds the device by more than that
FIT_MARGIN = 1.25


def refuse_what_cannot_fit(recipe: Recipe, arm: str, strategy: str, world_size: int, device_bytes: int | None) -> None:
    """A training arm whose estimated memory per GPU exceeds the GPU by more than the estimate's margin is refused
    before anything runs, with what would fit (more processes, FSDP)."""
    if not device_bytes or strategy != "ddp":
        return
    needed = replica_bytes(recipe, arm, world_size)
    if needed and needed > FIT_MARGIN * device_bytes:
        shard = " (FFT then shards with FSDP)" if arm in ("fft", "fft_continued") else ""
        raise MftBenchError(
            f"{arm} needs about {needed / 2**30:.0f} GiB per GPU as a whole replica, the GPU has "
            f"{device_bytes / 2**30:.0f} GiB: run on more GPUs (--nproc N){shard}, or lower per_device_batch_size / "
            "data.max_length, or turn on gradient_checkpointing (mft-bench plan RECIPE --nproc N shows the memory)"
        )


def replica_bytes(recipe: Recipe, arm: str, world_size: int = 1) -> int | None:
    """Estimated peak memory of one process training a whole replica of ``arm`` among ``world_size`` (DDP's
    gradient buckets included when there are several); None for an unknown model shape."""
    from mft_bench.cost import cpu_hardware, estimate_training, per_device_memory, shape_for_backbone

    shape = shape_for_backbone(recipe.backbone.name)
    if shape is None:
        return None
    spec = recipe.train_spec(arm)
    dtype_bytes = 4 if recipe.backbone.dtype == "float32" else 2
    micro = spec.per_device_batch_size * recipe.data.max_length
    kwargs = {"mask_layers": list(recipe.mask.layers)} if arm == "mft" else {}
    estimate = estimate_training(shape, "fft" if arm == "fft_continued" else arm, 0, hardware=cpu_hardware(1), dtype_bytes=dtype_bytes,
                                 gradient_checkpointing=spec.gradient_checkpointing, micro_batch_tokens=micro,
                                 seq_len=recipe.data.max_length,
                                 master_weights=spec.precision == "mixed" and dtype_bytes < 4, **kwargs)
    return sum(per_device_memory(estimate, shape, strategy="ddp", world_size=world_size,
                                 dtype_bytes=dtype_bytes).values())

