"""What each stage of a recipe will cost on a machine of N GPUs: time, peak memory per GPU, the disk it leaves,
and for each training arm the strategy a run on that machine would choose (``train.strategy.resolve_strategy`` with
the replica estimate the run uses). ``plan.py`` renders it.

Token counts come from the data stage's manifest when it is cached, else from the recipe (rows x an assumed mean
length, stated in the plan). Per-benchmark prompt/answer lengths are typical values of each protocol, declared by
each benchmark (``evaluation.base.BenchmarkFacts``); estimates use ``mft_bench.cost`` (standard FLOP formulas,
calibrated throughput).
Wall time on N GPUs follows the run: training stages use every GPU one after another; a block of consecutive
evaluation stages is dealt out round-robin, one stage per process at a time (``RunProcesses.share``), so the
block takes as long as its busiest process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mft_bench.arms import ARMS
from mft_bench.cost import (
    DISK_BYTES_PER_S,
    Estimate,
    Hardware,
    ModelShape,
    data_parallel_seconds,
    detect_hardware,
    estimate_generation,
    estimate_training,
    per_device_memory,
    shape_for_backbone,
)
from mft_bench.evaluation.registry import benchmark_facts
from mft_bench.recipe import Recipe
from mft_bench.stages import Stage

# rows of whole sources when a recipe takes all of them
KNOWN_SOURCE_ROWS = {"openai/gsm8k": 7473, "gsm8k": 7473}
ASSUMED_TOKENS_PER_ROW = 0.5  # fraction of max_length a chat row uses on average, when not measured
TOKENIZED_BYTES_PER_TOKEN = 3 * 8  # the data stage's input_ids, attention_mask, labels: int64 Arrow columns
RECORD_BYTES_PER_TOKEN, RECORD_BYTES_PER_ITEM = 4, 256  # records.jsonl: completion text, scores, hashes


@dataclass(frozen=True)
class DataCounts:
    train_rows: int
    train_tokens: int
    validation_tokens: int
    measured: bool

    @property
    def mean_row_tokens(self) -> float:
        return self.train_tokens / max(self.train_rows, 1)


@dataclass
class StageCost:
    """One stage's cost on the planned machine. ``seconds``: wall time (a training stage on all processes, any
    other on one); ``memory_bytes``: peak per GPU (None: runs on the host only); ``disk_bytes``: what it leaves."""

    stage: Stage
    seconds: float | None = None
    memory_bytes: int | None = None
    disk_bytes: int = 0
    flops: float | None = None
    runs_on: str = "main"
    fits: bool = True
    notes: list[str] = field(default_factory=list)
    estimate: Estimate | None = None  # the single-process estimate


@dataclass(frozen=True)
class PlanSummary:
    recipe: str
    hardware: Hardware
    nproc: int
    wall_s: float
    peak_bytes: int
    disk_bytes: int
    transient_disk_bytes: int
    not_fitting: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return not self.not_fitting


def _data_counts(recipe: Recipe, data_stage: Stage) -> DataCounts:
    if data_stage.done():
        counts = data_stage.manifest()["outputs"]["counts"]
        validation = counts.get("validation", {}).get("tokens", 0)
        return DataCounts(int(counts["train"]["rows"]), int(counts["train"]["tokens"]), int(validation), True)
    rows = sum(source.rows or KNOWN_SOURCE_ROWS.get(source.name.lower(), 10_000) for source in recipe.data.sources)
    train_rows = max(rows - recipe.data.validation_rows, 1)
    per_row = recipe.data.max_length * ASSUMED_TOKENS_PER_ROW
    return DataCounts(train_rows, int(train_rows * per_row), int(recipe.data.validation_rows * per_row), False)


def fmt_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"


def fmt_bytes(value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def fmt_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


# ----------------------------------------------------------------------------------------------------------
# Costs per stage
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    recipe: Recipe
    shape: ModelShape
    hardware: Hardware
    nproc: int
    dtype_bytes: int
    counts: DataCounts

    @property
    def dense_model_bytes(self) -> int:
        return self.shape.n_params * self.dtype_bytes


def _saves(recipe: Recipe, arm: str, counts: DataCounts, nproc: int) -> tuple[int, int]:
    """(Trainer saves, exports) of a training arm, counted as ``train/trainer.py`` schedules them: a save at every
    resume interval, at every export step and at the end."""
    from mft_bench.train.trainer import export_steps, updates_per_epoch

    spec = recipe.train_spec(arm)
    per_epoch = updates_per_epoch(counts.train_rows, spec.per_device_batch_size, spec.accumulation_steps(nproc), nproc)
    max_steps = spec.max_steps if spec.max_steps > 0 else math.ceil(spec.epochs * per_epoch)
    exports = set(export_steps(spec.export_count, max_steps))
    resume = set(range(spec.resume_every_steps, max_steps + 1, spec.resume_every_steps)) if spec.resume_every_steps \
        else set()
    return len(exports | resume | {max_steps}), len(exports)


def _train_cost(ctx: _Context, stage: Stage) -> StageCost:
    from mft_bench.translate import replica_bytes
    from mft_bench.train.strategy import resolve_strategy

    recipe, arm, counts, hw = ctx.recipe, stage.name, ctx.counts, ctx.hardware
    spec = recipe.train_spec(arm)
    costed = ARMS[arm].trainer  # priced as its training method (fft_continued: FFT's update, MFT's length)
    master = spec.precision == "mixed" and ctx.dtype_bytes < 4
    tokens = (int(spec.max_steps * spec.global_batch_size * counts.mean_row_tokens) if spec.max_steps > 0
              else int(counts.train_tokens * spec.epochs))
    kwargs = {"mask_layers": list(recipe.mask.layers)} if costed == "mft" else {}
    if costed == "lora":
        kwargs["lora_r"] = spec.r
    common = dict(hardware=hw, dtype_bytes=ctx.dtype_bytes, master_weights=master,
                  gradient_checkpointing=spec.gradient_checkpointing, **kwargs)
    row = max(int(counts.mean_row_tokens), 1)
    timed = estimate_training(ctx.shape, costed, tokens, seq_len=row, micro_batch_tokens=spec.per_device_batch_size * row,
                              tokens_per_step=spec.global_batch_size * row, **common)
    # memory with the longest rows a micro-batch can hold, as the run sizes its replica
    longest = recipe.data.max_length
    peak = estimate_training(ctx.shape, costed, 0, seq_len=longest, micro_batch_tokens=spec.per_device_batch_size * longest,
                             **common)
    replica = replica_bytes(recipe, arm, ctx.nproc)
    strategy = resolve_strategy(arm, spec.strategy, world_size=ctx.nproc, replica_bytes=replica,
                                device_bytes=hw.memory_bytes or None)
    parts = per_device_memory(peak, ctx.shape, strategy=strategy, world_size=ctx.nproc, dtype_bytes=ctx.dtype_bytes)
    memory = sum(parts.values())
    kept, written, disk_note = _train_disk(ctx, arm, peak, master)
    seconds = data_parallel_seconds(timed, strategy=strategy, world_size=ctx.nproc, hardware=hw)
    cost = StageCost(stage, seconds=seconds + written / DISK_BYTES_PER_S, memory_bytes=memory, disk_bytes=kept,
                     flops=timed.flops, runs_on=_runs_on(strategy, ctx), estimate=timed)
    cost.fits = hw.memory_bytes <= 0 or memory <= hw.memory_bytes
    if ctx.nproc > 1 or (costed == "fft" and ctx.dtype_bytes < 4):
        cost.notes.append(_memory_note(arm, strategy, parts, replica or peak.memory_bytes, ctx, master))
    cost.notes.append(disk_note)
    if not cost.fits:
        cost.notes.append(f"{arm} does not fit: {fmt_bytes(memory)} per {_unit(ctx)} > {fmt_bytes(hw.memory_bytes)}"
                          + _fit_advice(arm, strategy, ctx))
    return cost


def _train_disk(ctx: _Context, arm: str, peak: Estimate, master: bool) -> tuple[int, int, str]:
    """(bytes the arm's stage folder keeps, bytes it writes in all, a line saying what they are)."""
    from mft_bench.train.trainer import RESUME_CHECKPOINTS_KEPT

    saves, exports = _saves(ctx.recipe, arm, ctx.counts, ctx.nproc)
    checkpoint = int(peak.detail["checkpoint_bytes"])
    dense = ctx.dense_model_bytes
    if ARMS[arm].trainer == "mft":
        masks = math.ceil(peak.detail["masked_params"] / 8)  # bit-packed
        export_bytes, final_bytes = exports * masks, masks + dense  # + masks.safetensors and model/
        exported = f"{exports} bit-packed mask exports x {fmt_bytes(masks)}"
        final = f"masks.safetensors and a dense model/ ({fmt_bytes(dense)})"
    else:
        export_bytes, final_bytes = exports * dense, 0
        exported = f"{exports} dense export{'s' * (exports > 1)} x {fmt_bytes(dense)} ({ctx.recipe.backbone.dtype})"
        final = "model/ hard-links the last export"
    kept_checkpoints = min(saves, RESUME_CHECKPOINTS_KEPT)
    kept = export_bytes + final_bytes + kept_checkpoints * checkpoint
    written = export_bytes + final_bytes + saves * checkpoint
    note = (f"{arm} disk: {kept_checkpoints} resume checkpoint{'s' * (kept_checkpoints > 1)} x "
            f"{fmt_bytes(checkpoint)} (of {saves} written; {_checkpoint_content(arm, master, ctx)}) + {exported}; "
            f"{final}")
    return kept, written, note


def _unit(ctx: _Context) -> str:
    return "GPU" if ctx.hardware.device == "cuda" else "process"


def _runs_on(strategy: str, ctx: _Context) -> str:
    if ctx.nproc <= 1:
        return "1 GPU" if ctx.hardware.device == "cuda" else "1 proc"
    return f"{strategy} x{ctx.nproc}"


def _checkpoint_content(arm: str, master: bool, ctx: _Context) -> str:
    if ARMS[arm].trainer == "mft":
        return "fp32 scores + AdamW m, v"
    if ARMS[arm].trainer == "lora":
        return "adapters + AdamW m, v"
    weights = "fp32 master weights" if master else f"{ctx.recipe.backbone.dtype} weights"
    return f"{weights} + AdamW m, v; sharded or not, the same total"


def _memory_note(arm: str, strategy: str, parts: dict[str, int], replica: int, ctx: _Context, master: bool) -> str:
    total = sum(parts.values())
    breakdown = " + ".join(f"{fmt_bytes(v)} {k}" for k, v in parts.items())
    units = "GPUs" if ctx.hardware.device == "cuda" else "processes"
    where = f"{strategy} on {ctx.nproc} {units}" if ctx.nproc > 1 else f"one {_unit(ctx)}"
    why = ""
    if strategy == "fsdp":
        why = f" (a whole replica, {fmt_bytes(replica)}, exceeds {fmt_bytes(ctx.hardware.memory_bytes)})"
    precision = ""
    if ARMS[arm].trainer == "fft" and ctx.dtype_bytes < 4:
        precision = (" [mixed precision: fp32 master weights, grads and AdamW states + autocast's bf16 copies, "
                     "18 bytes/param; pure bf16 would be 8]" if master else " [pure bf16: 8 bytes/param]")
    return f"{arm}: {where}{why}: per {_unit(ctx)} {breakdown} = {fmt_bytes(total)}{precision}"


def _fit_advice(arm: str, strategy: str, ctx: _Context) -> str:
    if ARMS[arm].shardable and strategy == "ddp" and ctx.nproc > 1:
        return f"; set {ARMS[arm].settings}.strategy=fsdp to shard it over the {ctx.nproc} GPUs"
    if ARMS[arm].shardable and ctx.nproc == 1:
        return "; shard it over several GPUs (--nproc N) or use a GPU with more memory"
    return "; use a GPU with more memory or a smaller per_device_batch_size"


def _eval_cost(ctx: _Context, stage: Stage) -> StageCost:
    recipe, hw = ctx.recipe, ctx.hardware
    bench = next(b for b in recipe.evaluation.benchmarks if b.name == stage.benchmark)
    items, prompt, new, shared = benchmark_facts(bench.name).cost_shape(bench.options, bench.limit)
    sequences = items * int(bench.options.get("n_samples", 1))
    batch = recipe.evaluation.batch_size

    def generate(batch_size: int) -> Estimate:
        # both backends compute a shared prefix once (vLLM: prefix caching)
        return estimate_generation(ctx.shape, prompt_tokens=prompt, new_tokens=new, sequences=sequences,
                                   batch_size=batch_size, hardware=hw, dtype_bytes=ctx.dtype_bytes,
                                   shared_prompt_tokens=shared)

    est = generate(batch)
    cost = StageCost(stage, seconds=est.seconds, memory_bytes=est.memory_bytes, flops=est.flops, estimate=est,
                     disk_bytes=sequences * (new * RECORD_BYTES_PER_TOKEN + RECORD_BYTES_PER_ITEM),
                     runs_on="1 GPU" if hw.device == "cuda" else "1 proc")
    if hw.memory_bytes > 0 and est.memory_bytes > hw.memory_bytes:
        cost.fits = False
        fitting = [b for b in range(min(batch, sequences), 0, -1) if generate(b).memory_bytes <= hw.memory_bytes]
        advice = f"evaluation.batch_size={fitting[0]} fits" if fitting else "the model alone does not fit"
        cost.notes.append(f"{stage.name} does not fit at batch {batch}: {fmt_bytes(est.memory_bytes)} > "
                          f"{fmt_bytes(hw.memory_bytes)} ({advice})")
    return cost


def _mask_cost(ctx: _Context, stage: Stage) -> StageCost:
    band = len(ctx.recipe.mask.layers) * ctx.shape.linear_weights_per_layer
    disk = math.ceil(band / 8) + ctx.dense_model_bytes  # bit-packed masks + the dense masked model
    return StageCost(stage, seconds=ctx.dense_model_bytes / DISK_BYTES_PER_S, disk_bytes=disk)  # the write dominates


def _data_cost(ctx: _Context, stage: Stage) -> StageCost:
    tokens = ctx.counts.train_tokens + ctx.counts.validation_tokens
    return StageCost(stage, disk_bytes=tokens * TOKENIZED_BYTES_PER_TOKEN)


def stage_costs(recipe: Recipe, stages: list[Stage], hardware: Hardware | None = None,
                nproc: int = 1) -> tuple[list[StageCost], ModelShape | None, Hardware, DataCounts]:
    """The cost of every stage on ``nproc`` processes of ``hardware`` (default: this machine). Stages of a backbone
    whose shape is unknown get no estimate."""
    hardware = hardware or detect_hardware()
    by_name = {s.name: s for s in stages}
    counts = _data_counts(recipe, by_name["data"])
    shape = shape_for_backbone(recipe.backbone.name)
    if shape is None:
        return [StageCost(stage) for stage in stages], None, hardware, counts
    ctx = _Context(recipe, shape, hardware, nproc, 4 if recipe.backbone.dtype == "float32" else 2, counts)
    costs = []
    for stage in stages:
        if stage.kind == "train":
            costs.append(_train_cost(ctx, stage))
        elif stage.kind == "eval":
            costs.append(_eval_cost(ctx, stage))
        elif stage.kind == "mask":
            costs.append(_mask_cost(ctx, stage))
        else:
            costs.append(_data_cost(ctx, stage))
    return costs, shape, hardware, counts


def estimate_stages(recipe: Recipe, stages: list[Stage], hardware: Hardware | None = None, nproc: int = 1):
    """stage name -> single-process Estimate (training and evaluation stages), the hardware, the shape."""
    costs, shape, hardware, _ = stage_costs(recipe, stages, hardware, nproc)
    if shape is None:
        return {}, None, None
    return {c.stage.name: c.estimate for c in costs if c.estimate is not None}, hardware, shape


def wall_seconds(costs: list[StageCost], nproc: int) -> float:
    """Wall time of the stages still to run, in plan order: a block of consecutive evaluation stages is dealt out
    round-robin to the processes (stage i of the block on process i mod N; cached ones take no time) and lasts as
    long as its busiest process; every other stage runs alone."""
    total, index = 0.0, 0
    while index < len(costs):
        if costs[index].stage.kind != "eval":
            total += _remaining(costs[index])
            index += 1
            continue
        block = []
        while index < len(costs) and costs[index].stage.kind == "eval":
            block.append(costs[index])
            index += 1
        per_process = [sum(_remaining(c) for c in block[rank::max(nproc, 1)]) for rank in range(max(nproc, 1))]
        total += max(per_process)
    return total


def _remaining(cost: StageCost) -> float:
    return 0.0 if cost.stage.done() or cost.seconds is None or not math.isfinite(cost.seconds) else cost.seconds


def summarize(recipe: Recipe, costs: list[StageCost], hardware: Hardware, nproc: int) -> PlanSummary:
    peaks = [c.memory_bytes for c in costs if c.memory_bytes is not None]
    transient = max((int(c.estimate.detail["checkpoint_bytes"]) for c in costs
                     if c.stage.kind == "train" and c.estimate is not None), default=0)
    return PlanSummary(recipe=recipe.name, hardware=hardware, nproc=nproc, wall_s=wall_seconds(costs, nproc),
                       peak_bytes=max(peaks, default=0), disk_bytes=sum(c.disk_bytes for c in costs),
                       transient_disk_bytes=transient,
                       not_fitting=tuple(c.stage.name for c in costs if not c.fits))
