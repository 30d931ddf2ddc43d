"""``mft-bench plan``: the stages of a recipe, which are cached, and what each will cost on this hardware.

Token counts come from the data stage's manifest when it is cached, else from the recipe (rows x an assumed
mean length). Per-benchmark prompt/answer lengths are typical values of each protocol (documented below);
estimates use ``mft_bench.estimate`` (standard FLOP formulas, calibrated throughput).
"""

from __future__ import annotations

import math
from pathlib import Path

from mft_bench.plan import Stage, build_plan
from mft_bench.recipe import Recipe

# (items in the full test set, mean prompt tokens, mean generated tokens) per benchmark protocol
# items, prompt tokens, new tokens (typical, SmolLM2/LLaMA tokenizers), prompt tokens shared by all items
BENCHMARK_SHAPES = {
    "gsm8k": (1319, 900, 150, 740),  # 8-shot CoT prompt (the exemplars are shared); answers stop at "Question:"
    "humaneval": (164, 180, 200, 0),
    "humaneval_plain": (164, 160, 200, 0),
    "humaneval_plus": (164, 180, 200, 0),
    "ifeval": (541, 60, 400, 0),
    "synthetic_math": (200, 80, 100, 0),
}
LM_EVAL_SHAPE = (1000, 300, 50, 0)
# rows of whole sources when a recipe takes all of them
KNOWN_SOURCE_ROWS = {"openai/gsm8k": 7473, "gsm8k": 7473}
ASSUMED_TOKENS_PER_ROW = 0.5  # fraction of max_length a chat row uses on average, when not measured


def _training_tokens(recipe: Recipe, data_stage: Stage) -> int:
    if data_stage.done():
        counts = data_stage.manifest()["outputs"]["counts"]
        return int(counts["train"]["tokens"])
    rows = 0
    for source in recipe.data.sources:
        rows += source.rows or KNOWN_SOURCE_ROWS.get(source.name.lower(), 10_000)
    rows = max(rows - recipe.data.validation_rows, 1)
    return int(rows * recipe.data.max_length * ASSUMED_TOKENS_PER_ROW)


def _arm_tokens(spec, tokens_per_epoch: int, avg_row_tokens: float) -> int:
    if spec.max_steps and spec.max_steps > 0:
        return int(spec.max_steps * spec.global_batch_size * avg_row_tokens)
    return int(tokens_per_epoch * spec.epochs)


def _bench_shape(name: str, limit: int | None, options: dict) -> tuple[int, int, int, int]:
    items, prompt, new, shared = BENCHMARK_SHAPES.get(name, LM_EVAL_SHAPE)
    if name == "synthetic_math" and "n" in options:
        items = int(options["n"])
    if name == "gsm8k" and int(options.get("num_fewshot", 8)) < 8:  # fewer exemplars: shorter, less shared
        shots = int(options["num_fewshot"])
        prompt, shared = prompt - (8 - shots) * shared // 8, shots * shared // 8
    new = min(new, int(options.get("max_new_tokens", new)))
    return (min(items, limit) if limit else items), prompt, new, shared


def _fmt_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"


def _fmt_bytes(value: float) -> str:
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def estimate_stages(recipe: Recipe, stages: list[Stage]):
    """stage name -> Estimate (or None where no estimate applies)."""
    from mft_bench.estimate import detect_hardware, estimate_generation, estimate_training, shape_for_backbone

    shape = shape_for_backbone(recipe.backbone.name)
    if shape is None:
        return {}, None, None
    hardware = detect_hardware()
    dtype_bytes = 4 if recipe.backbone.dtype == "float32" else 2
    by_name = {s.name: s for s in stages}
    tokens_per_epoch = _training_tokens(recipe, by_name["data"])
    rows = sum(source.rows or KNOWN_SOURCE_ROWS.get(source.name.lower(), 10_000) for source in recipe.data.sources)
    avg_row = tokens_per_epoch / max(rows - recipe.data.validation_rows, 1)
    estimates = {}
    for stage in stages:
        if stage.kind == "train":
            spec = getattr(recipe, stage.name)
            tokens = _arm_tokens(spec, tokens_per_epoch, avg_row)
            kwargs = {"mask_layers": list(recipe.mask.layers)} if stage.name == "mft" else {}
            if stage.name == "lora":
                kwargs["lora_r"] = recipe.lora.r
            micro = max(int(spec.per_device_batch_size * avg_row), 1)
            estimates[stage.name] = estimate_training(
                shape, stage.name, tokens, hardware=hardware, dtype_bytes=dtype_bytes,
                gradient_checkpointing=spec.gradient_checkpointing, seq_len=max(int(avg_row), 1),
                micro_batch_tokens=micro, tokens_per_step=int(spec.global_batch_size * avg_row), **kwargs)
        elif stage.kind == "eval":
            bench = next(b for b in recipe.evaluation.benchmarks if b.name == stage.benchmark)
            items, prompt, new, shared = _bench_shape(bench.name, bench.limit, bench.options)
            n = int(bench.options.get("n_samples", 1))
            estimates[stage.name] = estimate_generation(
                shape, prompt_tokens=prompt, new_tokens=new, sequences=items * n,
                batch_size=recipe.evaluation.batch_size, hardware=hardware, dtype_bytes=dtype_bytes,
                shared_prompt_tokens=shared)  # both backends compute a shared prefix once (vLLM: prefix caching)
    return estimates, hardware, shape


def render_plan(recipe: Recipe, run_dir: Path) -> str:
    stages = build_plan(recipe, run_dir)
    estimates, hardware, shape = estimate_stages(recipe, stages)
    lines = [f"recipe {recipe.name}  ->  {run_dir}"]
    if hardware is not None:
        lines.append(f"hardware: {hardware.name}; backbone {recipe.backbone.name}: "
                     f"{shape.n_params / 1e6:.0f}M parameters, {shape.num_layers} layers")
    else:
        lines.append(f"no cost model for backbone '{recipe.backbone.name}' (unknown shape): estimates omitted")
    header = f"{'stage':<40} {'status':<8} {'FLOPs':>12} {'memory':>10} {'time':>9}  depends on"
    lines += [header, "-" * len(header)]
    total = 0.0
    for stage in stages:
        est = estimates.get(stage.name)
        status = "cached" if stage.done() else "todo"
        flops = _fmt_flops(est.flops) if est else "-"
        memory = _fmt_bytes(est.memory_bytes) if est else "-"
        seconds = _fmt_seconds(est.seconds) if est else "-"
        if est and not stage.done() and math.isfinite(est.seconds):
            total += est.seconds
        lines.append(f"{stage.name:<40} {status:<8} {flops:>12} {memory:>10} {seconds:>9}  {', '.join(stage.deps)}")
    if estimates:
        lines.append(f"estimated time of the remaining stages: {_fmt_seconds(total)} (plus model loading)")
    return "\n".join(lines)
