"""What the cost estimates know about a machine: a table of GPUs users can name (``mft-bench plan --hardware``),
this machine's detection, and the calibration of utilisation against measurements.

A :class:`Hardware` holds *effective* rates (spec sheet x utilisation). CPU rates are calibrated on the development
machine; GPU rates are spec-sheet peaks times utilisation factors calibrated once, below, against the measured
H200 anchors (``tests/test_cost.py`` pins each anchor with its tolerance).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mft_bench.errors import MftBenchError
from mft_bench.model_shape import KNOWN_SHAPES, ModelShape

logger = logging.getLogger(__name__)

MIB = 1024**2

# --- CPU calibration (development CPU: 2-vCPU Xeon @ 2.5 GHz with AVX-512, fp32, SmolLM2-135M) ---------------
# Training matmul throughput of one core, from process CPU time of single-threaded FFT and MFT steps
# (benchmarks/plan_accuracy.py --threads 1: FFT 3.6 s per 128-token step incl. AdamW, MFT 1.2-2.1 s), with AdamW
# modelled separately as memory traffic. CPU time, not wall time, because the machine is shared.
_CPU_TRAIN_FLOPS_PER_CORE = 40e9
# Extra threads help little for a 135M model on this shared VM (2 threads spend ~20% more CPU time for the same
# step, and the recorded wall-clock rate with 2 threads was 30 tokens/s FFT): each core beyond the first counts
# as 0.15 of one. Pessimistic for larger or idle CPUs.
_CPU_EXTRA_CORE_EFFICIENCY = 0.15
# Batched generation ran at ~145 new tokens/s at batch 32 on 2 threads (HF generate, KV cache, short prompts).
_CPU_CALIB_GEN_TOKENS_PER_S = 145.0
_CPU_CALIB_GEN_BATCH = 32
_CPU_CALIB_CORES = 2
_CPU_MEM_BANDWIDTH_PER_CORE = 8e9  # bytes/s one core streams in practice (effective, not peak)
# Per-layer Python/kernel-launch overhead of one HF forward step (dominates small-batch decoding).
_CPU_LAYER_OVERHEAD_S = 3e-4
# CPUs with native bf16 dot products (AVX512-BF16, AMX): bf16 compute over fp32, measured on the AMD EPYC
# (AVX512-BF16) development machine of 2026-12-02, the default recipe in both dtypes, nothing else running:
# FFT steps 1.51x, the control's 1.63x, MFT's 1.81x; each 100-item evaluation 1.8-2.2x (its weight streaming,
# halved by bf16 in the model already, is part of that).
_CPU_BF16_TRAIN_SPEEDUP = 1.6
_CPU_BF16_GEN_SPEEDUP = 1.8
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

# --- GPU calibration: the one place where GPU utilisation is set ---------------------------------------------
# Anchors, measured on one H200 with the LLaMA-2-7B shape (random weights), 4 x 2048 tokens per optimizer step,
# gradient checkpointing, bf16:
#   FFT 9,522 tokens/s and MFT (band of layers 20-23) 18,456 tokens/s; HF ``generate`` 344-500 new tokens/s at
#   batch 32.
# _GPU_TRAIN_MFU: FFT with checkpointing costs 57.2 GFLOP per token (6N + attention + the recomputed forward,
#   cost.py); 9,522 tokens/s is 0.86 s per 8,192-token step, of which AdamW's memory traffic takes ~0.08 s,
#   leaving 8,192 x 57.2e9 / 0.78 s = 6.0e14 FLOP/s = 0.61 of the H200's 989 TFLOP/s bf16 peak. The same
#   fraction is assumed for every GPU (same kernels, same framework).
_GPU_TRAIN_MFU = 0.61
# _GPU_ROW_OVERHEAD_S: at batch 32 a 7B decode step moves 13 GB of weights (3.9 ms at 70% of 4.8 TB/s) and
#   computes 0.4 TFLOP (0.9 ms): HF ``generate``'s 64-93 ms per step (344-500 tokens/s; 77 ms at the geometric
#   middle, 415 tokens/s) is overhead, 2.29 ms per decoder layer and step. Of that, _GPU_LAYER_OVERHEAD_S (kernel
#   launches, Python: ~10 kernels of ~60 us per layer, as at batch 1) is fixed; the rest grows with the rows of the
#   batch (per-row elementwise work, masks, cache updates): (2.29 - 0.6) / 32 = 0.053 ms per layer and row.
_GPU_LAYER_OVERHEAD_S = 6e-4
_GPU_ROW_OVERHEAD_S = 5.3e-5
# Not anchored (spec-sheet typical values): compute-bound prefill efficiency and the fraction of spec memory
# bandwidth memory-bound kernels reach.
_GPU_GEN_MFU = 0.50
_GPU_BW_EFFICIENCY = 0.70


@dataclass(frozen=True)
class GpuSpec:
    """Spec-sheet numbers of one GPU model. ``key``: the name users type; ``match``: substrings that must all
    appear in ``torch.cuda.get_device_name`` (case-insensitive); ``memory_mib``: memory as nvidia-smi reports it."""

    key: str
    name: str
    match: tuple[str, ...]
    bf16_flops: float  # dense tensor-core peak
    fp32_flops: float  # without TF32 (torch's default for matmuls)
    bandwidth: float  # bytes/s
    memory_mib: int


# Order matters for detection: more specific matches first.
GPU_SPECS: tuple[GpuSpec, ...] = (
    GpuSpec("h200", "NVIDIA H200", ("H200",), 989e12, 67e12, 4.8e12, 143_771),
    GpuSpec("h100-pcie", "NVIDIA H100 PCIe", ("H100", "PCIe"), 756e12, 51e12, 2.0e12, 81_559),
    GpuSpec("h100-80gb", "NVIDIA H100 80GB HBM3", ("H100",), 989e12, 67e12, 3.35e12, 81_559),
    GpuSpec("a100-80gb", "NVIDIA A100-SXM4-80GB", ("A100", "80GB"), 312e12, 19.5e12, 2.04e12, 81_920),
    GpuSpec("a100-40gb", "NVIDIA A100-SXM4-40GB", ("A100",), 312e12, 19.5e12, 1.55e12, 40_960),
    GpuSpec("l40s", "NVIDIA L40S", ("L40S",), 362e12, 91.6e12, 0.864e12, 46_068),
    GpuSpec("a10", "NVIDIA A10", ("A10",), 125e12, 31.2e12, 0.6e12, 23_028),
    GpuSpec("rtx4090", "NVIDIA GeForce RTX 4090", ("4090",), 165e12, 82.6e12, 1.0e12, 24_564),
    GpuSpec("v100-32gb", "Tesla V100-SXM2-32GB", ("V100",), 125e12, 15.7e12, 0.9e12, 32_768),
    GpuSpec("t4", "Tesla T4", ("T4",), 65e12, 8.1e12, 0.32e12, 15_360),
)
_GPU_UNKNOWN = GpuSpec("unknown", "unknown GPU", (), 60e12, 8e12, 0.3e12, 0)  # conservative (T4-class)


@dataclass(frozen=True)
class Hardware:
    """What the estimates need to know about the machine.

    ``peak_flops``: *effective* training FLOP/s (utilisation included) in 16-bit compute (bf16 on CUDA; on CPU
    equal to fp32 unless it has native bf16 dot products). ``fp32_flops``: the same for fp32 training (on CUDA
    without TF32, torch's default for matmuls). ``gen_flops``: effective FLOP/s of batched decoding/prefill in
    the hardware's preferred precision; ``gen_fp32_flops``: in fp32 (None: the same).
    ``memory_bandwidth``: effective bytes/s of memory-bound kernels. ``layer_overhead_s``: fixed launch /
    Python cost per decoder layer per forward step; ``row_overhead_s``: the part of a decode step's overhead per
    layer that grows with each row of the batch. ``memory_bytes``: device memory (GPU) or RAM (CPU); 0 when
    unknown.
    """

    name: str
    device: Literal["cpu", "cuda"]
    peak_flops: float
    memory_bytes: int
    fp32_flops: float
    gen_flops: float
    memory_bandwidth: float
    gen_fp32_flops: float | None = None
    layer_overhead_s: float = _CPU_LAYER_OVERHEAD_S
    row_overhead_s: float = 0.0
    cores: int = 1

    def train_flops(self, dtype_bytes: int) -> float:
        """Effective training FLOP/s for compute in ``dtype_bytes`` (4: fp32; 2: bf16/fp16)."""
        return self.fp32_flops if dtype_bytes >= 4 else self.peak_flops

    def generation_flops(self, dtype_bytes: int) -> float:
        """Effective decoding/prefill FLOP/s for weights in ``dtype_bytes``."""
        return self.gen_fp32_flops if dtype_bytes >= 4 and self.gen_fp32_flops is not None else self.gen_flops

    def decode_step_seconds(self, shape: ModelShape, *, batch_size: int, context: int, dtype_bytes: int = 4) -> float:
        """Seconds for one decoding step of ``batch_size`` sequences at KV length ``context``: the larger of
        compute and weight+KV streaming, plus the per-layer overhead (fixed, and per row)."""
        flops = batch_size * (2 * shape.matmul_params + 4 * shape.num_layers * shape.attn_dim * context)
        weight_bytes = shape.matmul_params * dtype_bytes
        kv_bytes = batch_size * context * shape.num_layers * 2 * shape.kv_dim * dtype_bytes
        compute = flops / self.generation_flops(dtype_bytes)
        stream = (weight_bytes + kv_bytes) / self.memory_bandwidth
        # On CPU the weights stream while cores compute only partly: add rather than overlap.
        bound = compute + stream if self.device == "cpu" else max(compute, stream)
        return bound + shape.num_layers * (self.layer_overhead_s + batch_size * self.row_overhead_s)

    def gen_tokens_per_s(self, shape: ModelShape, *, batch_size: int, context: int = 256, dtype_bytes: int = 4) -> float:
        """Modelled decoding throughput (new tokens/s summed over the batch)."""
        return batch_size / self.decode_step_seconds(shape, batch_size=batch_size, context=context,
                                                      dtype_bytes=dtype_bytes)


def _effective_cores(cores: int) -> float:
    return 1 + _CPU_EXTRA_CORE_EFFICIENCY * (max(cores, 1) - 1)


def cpu_hardware(cores: int, *, memory_bytes: int = 0, name: str = "cpu", bf16: bool = False) -> Hardware:
    """A CPU description calibrated on the development machine (see the constants above).

    Training: 40 GFLOP/s per core (single-thread CPU time), extra cores at 15% efficiency.
    Decoding: ``gen_flops`` is solved so that the decode model gives 145 tokens/s at batch 32 on 2 threads.
    ``bf16``: the CPU has native bf16 dot products (``cpu_has_bf16``): bf16 compute is faster by the measured
    ``_CPU_BF16_*_SPEEDUP``; without them bf16 is no faster than fp32 (``fp32_flops == peak_flops``).
    """
    scale = _effective_cores(cores)
    calib_scale = _effective_cores(_CPU_CALIB_CORES)
    # Solve the calibrated decode step for its compute part (2 threads, short context).
    calib = KNOWN_SHAPES["smollm2-135m"]
    step = _CPU_CALIB_GEN_BATCH / _CPU_CALIB_GEN_TOKENS_PER_S
    context = 64
    kv_bytes = _CPU_CALIB_GEN_BATCH * context * calib.num_layers * 2 * calib.kv_dim * 4
    stream = (calib.matmul_params * 4 + kv_bytes) / (_CPU_MEM_BANDWIDTH_PER_CORE * calib_scale)
    compute = step - stream - calib.num_layers * _CPU_LAYER_OVERHEAD_S
    calib_flops = _CPU_CALIB_GEN_BATCH * (2 * calib.matmul_params + 4 * calib.num_layers * calib.attn_dim * context)
    gen_per_core = calib_flops / compute / calib_scale
    train = _CPU_TRAIN_FLOPS_PER_CORE * scale
    gen = gen_per_core * scale
    train_bf16, gen_bf16 = (train * _CPU_BF16_TRAIN_SPEEDUP, gen * _CPU_BF16_GEN_SPEEDUP) if bf16 else (train, gen)
    return Hardware(
        name=name, device="cpu", peak_flops=train_bf16, fp32_flops=train, memory_bytes=memory_bytes,
        gen_flops=gen_bf16, gen_fp32_flops=gen, memory_bandwidth=_CPU_MEM_BANDWIDTH_PER_CORE * scale,
        layer_overhead_s=_CPU_LAYER_OVERHEAD_S, cores=cores,
    )


def _spec_for_device(name: str) -> GpuSpec | None:
    lowered = name.lower()
    return next((s for s in GPU_SPECS if all(m.lower() in lowered for m in s.match)), None)


def _from_spec(spec: GpuSpec, name: str, memory_bytes: int) -> Hardware:
    return Hardware(
        name=name, device="cuda", peak_flops=spec.bf16_flops * _GPU_TRAIN_MFU,
        fp32_flops=spec.fp32_flops * _GPU_TRAIN_MFU, memory_bytes=memory_bytes,
        gen_flops=spec.bf16_flops * _GPU_GEN_MFU, memory_bandwidth=spec.bandwidth * _GPU_BW_EFFICIENCY,
        layer_overhead_s=_GPU_LAYER_OVERHEAD_S, row_overhead_s=_GPU_ROW_OVERHEAD_S,
    )


def gpu_hardware(name: str, *, memory_bytes: int = 0) -> Hardware:
    """A CUDA device by its ``torch.cuda.get_device_name`` (matched against :data:`GPU_SPECS`), with the
    calibrated utilisation. Unknown GPUs get conservative T4-class numbers."""
    spec = _spec_for_device(name)
    if spec is None:
        logger.warning("GPU '%s' is not in the estimate table; using conservative numbers", name)
        spec = _GPU_UNKNOWN
    return _from_spec(spec, name, memory_bytes)


def known_gpu_names() -> tuple[str, ...]:
    """The names ``--hardware`` accepts."""
    return tuple(spec.key for spec in GPU_SPECS)


def hardware_by_name(key: str) -> Hardware:
    """One GPU of a kind users name (``a100-80gb``, ``h100-80gb``, ``h200``, ...: :func:`known_gpu_names`).
    Raises :class:`MftBenchError` naming the known ones for anything else."""
    wanted = key.strip().lower()
    spec = next((s for s in GPU_SPECS if s.key == wanted), None)
    if spec is None:
        raise MftBenchError(f"unknown hardware '{key}'; known: {', '.join(known_gpu_names())}")
    return _from_spec(spec, f"{spec.key} ({spec.name}, {spec.memory_mib / 1024:.1f} GiB)", spec.memory_mib * MIB)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_hardware() -> Hardware:
    """Describe this machine: the first CUDA device if torch sees one, else the CPU with torch's thread count."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return gpu_hardware(props.name, memory_bytes=int(props.total_memory))
    cores = max(1, torch.get_num_threads())
    bf16 = cpu_has_bf16()
    return cpu_hardware(cores, memory_bytes=_ram_bytes(), name=f"cpu ({cores} threads{', bf16' if bf16 else ''})",
                        bf16=bf16)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU flags (``/proc/cpuinfo``, or the text given) name native bf16 dot products."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in _CPU_BF16_FLAGS)
