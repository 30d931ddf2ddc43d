"""Cost estimates (FLOPs, memory, seconds) for the stages ``mft-bench plan`` shows before anything runs.

Everything here is closed-form arithmetic on a :class:`ModelShape` and a :class:`Hardware` description; no
model is built and nothing touches the network. The numbers are meant to be right within ~2x, which is
what ``benchmarks/plan_accuracy.py`` checks on the machine at hand.

Conventions and assumptions (read before trusting a number):

- ``N`` in the FLOP formulas is the *matmul* parameter count: every decoder-layer weight matrix plus the
  LM head (``vocab x hidden``). The input embedding is a lookup, not a matmul, so an untied input embedding
  costs no FLOPs; with tied embeddings the one matrix is counted once, as the LM head.
- A FLOP is one multiply or one add (a multiply-accumulate is 2 FLOPs), as in Kaplan et al. 2020 and the
  PaLM MFU formula.
- Training FLOPs per token (PaLM, appendix B): forward ``2N + 4*L*d_attn*S``, backward twice that, so
  FFT = ``6N + 12*L*d_attn*S`` with ``S`` the sequence length (full, not causal-halved, attention matrix).
- MFT (the official method: frozen weights, a learned score tensor per masked matrix, straight-through top-k):
  the forward is the full ``2N``; the backward stops at the lowest masked layer, because nothing below it
  needs a gradient. Above it, activation gradients cost ``2*N_above`` per token, and only the masked matrices
  need the weight-gradient-like product ``grad_W_eff = dy^T x`` (``2*N_masked``) from which the score
  gradient is read off elementwise. Per optimizer step the mask is re-selected (``kthvalue``/``topk`` over
  every masked weight, ``O(numel)`` memory traffic), modelled as a few passes over the scores.
- LoRA: full forward, activation gradients through every layer (adapters sit in every layer) ``2N``, plus
  the adapters' own forward/backward ``6*N_lora``.
- Memory = persistent state (weights, gradients, optimizer states, scores) + activations of one micro-batch
  + the fp32 logits of one micro-batch. Activations are counted per token per layer as the tensors autograd
  keeps for a LLaMA-style block with an SDPA/flash attention kernel (no ``S x S`` matrix stored). This is an
  upper bound for frozen layers, whose matmuls need not keep their inputs. With gradient checkpointing only
  each layer's input is kept, plus one layer's activations during recomputation.
- Precision of persistent state: ``dtype_bytes=4`` is plain fp32 training (weights, grads, AdamW m and v all
  fp32: 16 bytes/param). ``dtype_bytes=2`` is *pure* bf16 -- the model loaded in bf16 and trained with HF
  Trainer/AdamW, so grads and AdamW states are bf16 too (8 bytes/param); this is what the official MFT code
  most likely ran (its model is loaded in bf16 under DeepSpeed), and it is what reproduces the measured
  H200 memory below. ``master_weights=True`` adds an fp32 master copy and fp32 states (mixed precision:
  2 + 2 + 4 + 4 + 4 = 16 bytes/param). MFT scores, their gradients and their AdamW states are always fp32
  (the official code creates the scores as fp32 parameters).
- Time = FLOPs / effective FLOP/s + per-optimizer-step memory-bound work (AdamW update, mask selection) +
  per-micro-batch elementwise mask work. The effective FLOP/s already contains the utilisation (MFU).

Sanity check against a measurement on an H200 (LLaMA-2-7B shape, 4x2048 tokens/step, layers 20-23 masked,
bf16): measured MFT/FFT step time 0.52, memory 26 GiB (MFT) vs 63 GiB (FFT). These formulas give a time
ratio of 0.51 (0.48 with gradient checkpointing) and, with gradient checkpointing, 30 GiB vs 56 GiB (without:
45 vs 98 GiB, so the measurement most likely used checkpointing). ``benchmarks/plan_accuracy.py`` prints this
comparison and times the CPU stages against these estimates.

CPU numbers are calibrated on the development machine (2 vCPUs, shared); other CPUs are scaled by thread count
with a deliberately pessimistic efficiency for extra threads. GPU numbers come from spec sheets and typical
utilisation and have not been checked against a GPU run other than the H200 ratio above.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

Arm = Literal["fft", "mft", "lora"]
ARMS: tuple[str, ...] = ("fft", "mft", "lora")
GIB = 1024**3

# --- calibration constants (development CPU: 2-vCPU Xeon @ 2.5 GHz with AVX-512, fp32, SmolLM2-135M) --------
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
_GPU_LAYER_OVERHEAD_S = 6e-4
# Model loading: GGUF is dequantized in Python/numpy by transformers (SmolLM2-135M: ~20 s on 2 cores,
# of which a few seconds are tokenizer conversion); plain safetensors are read at disk speed.
_GGUF_PARAMS_PER_S = 8e6  # numpy dequantisation is effectively single-threaded: does not scale with cores
_LOAD_FIXED_S = 3.0
_DISK_BYTES_PER_S = 1e9
_H2D_BYTES_PER_S = 20e9

_GPU_TRAIN_MFU = 0.40  # typical HF Trainer utilisation for a 7B model
_GPU_GEN_MFU = 0.50  # compute-bound decoding/prefill efficiency
_GPU_BW_EFFICIENCY = 0.70  # fraction of spec memory bandwidth reached by memory-bound kernels
_MASK_SELECT_PASSES = 8  # |s|, kthvalue/topk (several passes), compare, cast: ~8 reads/writes of 4 bytes
_MASK_APPLY_PASSES = 6  # per micro-batch: W*mask forward, grad_W_eff*W*sign(s) backward
_ADAMW_PASSES = 5  # torch's foreach AdamW: ~5 kernels, each reading/writing parameter-sized tensors

# GPU table: substring of torch.cuda.get_device_name -> (bf16 dense peak FLOP/s, fp32 (non-TF32) peak, bytes/s).
# Order matters: more specific names first.
_GPU_TABLE: tuple[tuple[str, float, float, float], ...] = (
    ("H200", 989e12, 67e12, 4.8e12),
    ("H100 PCIe", 756e12, 51e12, 2.0e12),
    ("H100", 989e12, 67e12, 3.35e12),
    ("A100-SXM4-80GB", 312e12, 19.5e12, 2.04e12),
    ("A100", 312e12, 19.5e12, 1.55e12),
    ("L40S", 362e12, 91.6e12, 0.864e12),
    ("A10", 125e12, 31.2e12, 0.6e12),
    ("4090", 165e12, 82.6e12, 1.0e12),
    ("V100", 125e12, 15.7e12, 0.9e12),
    ("T4", 65e12, 8.1e12, 0.32e12),
)
_GPU_UNKNOWN = ("unknown GPU", 60e12, 8e12, 0.3e12)  # conservative (T4-class)


# ----------------------------------------------------------------------------------------------------------
# Model shape
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that its cost depends on.

    ``gated_mlp``: three MLP matrices (gate, up, down; LLaMA family) instead of two (GPT-2, GPT-NeoX).
    ``qkv_bias``: biases on q/k/v only (Qwen2); ``linear_bias``: biases on every linear (GPT-2, GPT-NeoX).
    ``layer_norm``: LayerNorm with bias (2h params) instead of RMSNorm (h params).
    ``position_embeddings``: learned absolute positions (GPT-2); 0 for rotary models.
    """

    arch: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    gated_mlp: bool = True
    qkv_bias: bool = False
    linear_bias: bool = False
    layer_norm: bool = False
    position_embeddings: int = 0

    # -- derived sizes -----------------------------------------------------------------------------------
    @property
    def attn_dim(self) -> int:
        """Width of the query/attention output (``heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_weights_per_layer(self) -> int:
        """Weight elements of one layer's linear matrices (q, k, v, o + MLP): what MFT masks."""
        attn = self.hidden * (self.attn_dim + 2 * self.kv_dim) + self.attn_dim * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return attn + mlp

    @property
    def params_per_layer(self) -> int:
        """All parameters of one decoder layer (weights, biases, norms)."""
        bias = 0
        if self.linear_bias:
            bias = (self.attn_dim + 2 * self.kv_dim) + self.hidden + self.intermediate * (2 if self.gated_mlp else 1)
            bias += self.hidden
        elif self.qkv_bias:
            bias = self.attn_dim + 2 * self.kv_dim
        norms = 2 * self.hidden * (2 if self.layer_norm else 1)
        return self.linear_weights_per_layer + bias + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.position_embeddings * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Parameters of a separate LM head (0 when tied to the input embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        """Total parameter count, as ``sum(p.numel() for p in model.parameters())`` reports it."""
        final_norm = self.hidden * (2 if self.layer_norm else 1)
        return self.num_layers * self.params_per_layer + self.embedding_params + self.lm_head_params + final_norm

    @property
    def matmul_params(self) -> int:
        """``N`` of the FLOP formulas: decoder linear weights plus the LM head matmul (tied or not)."""
        return self.num_layers * self.linear_weights_per_layer + self.vocab * self.hidden

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """Read a shape from a transformers config (llama, qwen2, mistral, gpt_neox, gpt2; other LLaMA-like
        configs with the usual field names work too). Raises :class:`MftBenchError` when a field is missing."""
        model_type = getattr(config, "model_type", "") or ""
        try:
            if model_type == "gpt2":
                hidden, heads = int(config.n_embd), int(config.n_head)
                return cls(
                    arch="gpt2", num_layers=int(config.n_layer), hidden=hidden,
                    intermediate=int(config.n_inner or 4 * hidden), vocab=int(config.vocab_size),
                    num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                    tied_embeddings=bool(getattr(config, "tie_word_embeddings", True)), gated_mlp=False,
                    linear_bias=True, layer_norm=True, position_embeddings=int(config.n_positions),
                )
            hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            common = dict(
                num_layers=int(config.num_hidden_layers), hidden=hidden, intermediate=int(config.intermediate_size),
                vocab=int(config.vocab_size), num_heads=heads, head_dim=int(head_dim),
                tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            )
            if model_type == "gpt_neox":
                return cls(arch="gpt_neox", num_kv_heads=heads, gated_mlp=False,
                           linear_bias=bool(getattr(config, "attention_bias", True)), layer_norm=True, **common)
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
            return cls(arch=model_type or "llama", num_kv_heads=int(kv_heads), qkv_bias=qkv_bias, **common)
        except (AttributeError, TypeError) as exc:
            raise MftBenchError(
                f"cannot read the model shape from a '{model_type or type(config).__name__}' config ({exc}); "
                "supported: llama, qwen2, mistral, gpt_neox, gpt2"
            ) from exc


def _llama(num_layers: int, hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
           tied: bool, arch: str = "llama", **extra: Any) -> ModelShape:
    return ModelShape(arch=arch, num_layers=num_layers, hidden=hidden, intermediate=intermediate, vocab=vocab,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, tied_embeddings=tied,
                      **extra)


def _tiny(arch: str) -> ModelShape:
    """The shapes ``mft_bench.backbone.tiny_model`` builds (hidden 32, 4 layers, byte vocab 259)."""
    if arch == "gpt2":
        return ModelShape(arch="gpt2", num_layers=4, hidden=32, intermediate=128, vocab=259, num_heads=4,
                          num_kv_heads=4, head_dim=8, tied_embeddings=True, gated_mlp=False, linear_bias=True,
                          layer_norm=True, position_embeddings=8192)
    if arch == "gpt_neox":
        return ModelShape(arch="gpt_neox", num_layers=4, hidden=32, intermediate=64, vocab=259, num_heads=4,
                          num_kv_heads=4, head_dim=8, tied_embeddings=False, gated_mlp=False, linear_bias=True,
                          layer_norm=True)
    return _llama(4, 32, 64, 259, 4, 2, False, arch=arch, qkv_bias=arch == "qwen2")


_SMOLLM2_135M = _llama(30, 576, 1536, 49152, 9, 3, True)
_SMOLLM2_360M = _llama(32, 960, 2560, 49152, 15, 5, True)
_LLAMA2_7B = _llama(32, 4096, 11008, 32000, 32, 32, False)
_LLAMA2_13B = _llama(40, 5120, 13824, 32000, 40, 40, False)
_LLAMA31_8B = _llama(32, 4096, 14336, 128256, 32, 8, False)
_MISTRAL_7B = _llama(32, 4096, 14336, 32000, 32, 8, False, arch="mistral")
_QWEN25_05B = _llama(24, 896, 4864, 151936, 14, 2, True, arch="qwen2", qkv_bias=True)

KNOWN_SHAPES: Mapping[str, ModelShape] = MappingProxyType({
    "smollm2-135m": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-360M-Instruct": _SMOLLM2_360M,
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-13b-hf": _LLAMA2_13B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B": _LLAMA31_8B,
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    **{f"tiny:{arch}": _tiny(arch) for arch in ("llama", "qwen2", "mistral", "gpt_neox", "gpt2")},
})


def shape_for_backbone(name: str) -> ModelShape | None:
    """The shape of a backbone by name, without network: a :data:`KNOWN_SHAPES` entry (case-insensitive), or a
    local folder's ``config.json``. ``None`` if unknown (the plan then shows no estimate for it)."""
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    lowered = {key.lower(): shape for key, shape in KNOWN_SHAPES.items()}
    if name.lower().rstrip("/") in lowered:
        return lowered[name.lower().rstrip("/")]
    if (Path(name) / "config.json").is_file():
        try:
            from transformers import AutoConfig

            return ModelShape.from_config(AutoConfig.from_pretrained(name, local_files_only=True))
        except (OSError, ValueError, MftBenchError) as exc:
            logger.warning("no cost estimate for backbone '%s': %s", name, exc)
    return None


# ----------------------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """What the estimates need to know about the machine.

    ``peak_flops``: *effective* training FLOP/s (utilisation included) in the hardware's preferred training
    precision (bf16 on CUDA, fp32 on CPU). ``fp32_flops``: the same for fp32 training (on CUDA without TF32,
    torch's default for matmuls). ``gen_flops``: effective FLOP/s of batched decoding/prefill.
    ``memory_bandwidth``: effective bytes/s of memory-bound kernels. ``layer_overhead_s``: fixed launch /
    Python cost per decoder layer per forward step. ``memory_bytes``: device memory (GPU) or RAM (CPU).
    """

    name: str
    device: Literal["cpu", "cuda"]
    peak_flops: float
    memory_bytes: int
    fp32_flops: float
    gen_flops: float
    memory_bandwidth: float
    layer_overhead_s: float = _CPU_LAYER_OVERHEAD_S
    cores: int = 1

    def train_flops(self, dtype_bytes: int) -> float:
        """Effective training FLOP/s for weights of ``dtype_bytes`` (4: fp32; 2: bf16/fp16)."""
        return self.fp32_flops if dtype_bytes >= 4 else self.peak_flops

    def decode_step_seconds(self, shape: ModelShape, *, batch_size: int, context: int, dtype_bytes: int = 4) -> float:
        """Seconds for one decoding step of ``batch_size`` sequences at KV length ``context``: the larger of
        compute and weight+KV streaming, plus the per-layer overhead."""
        flops = batch_size * (2 * shape.matmul_params + 4 * shape.num_layers * shape.attn_dim * context)
        weight_bytes = shape.matmul_params * dtype_bytes
        kv_bytes = batch_size * context * shape.num_layers * 2 * shape.kv_dim * dtype_bytes
        compute = flops / self.gen_flops
        stream = (weight_bytes + kv_bytes) / self.memory_bandwidth
        # On CPU the weights stream while cores compute only partly: add rather than overlap.
        bound = compute + stream if self.device == "cpu" else max(compute, stream)
        return bound + shape.num_layers * self.layer_overhead_s

    def gen_tokens_per_s(self, shape: ModelShape, *, batch_size: int, context: int = 256, dtype_bytes: int = 4) -> float:
        """Modelled decoding throughput (new tokens/s summed over the batch)."""
        return batch_size / self.decode_step_seconds(shape, batch_size=batch_size, context=context,
                                                      dtype_bytes=dtype_bytes)


def _effective_cores(cores: int) -> float:
    return 1 + _CPU_EXTRA_CORE_EFFICIENCY * (max(cores, 1) - 1)


def cpu_hardware(cores: int, *, memory_bytes: int = 0, name: str = "cpu") -> Hardware:
    """A CPU description calibrated on the development machine (see the constants above).

    Training: 40 GFLOP/s per core (single-thread CPU time), extra cores at 15% efficiency.
    Decoding: ``gen_flops`` is solved so that the decode model gives 145 tokens/s at batch 32 on 2 threads.
    bf16 is assumed no faster than fp32 on CPU (true without AMX), so ``fp32_flops == peak_flops``.
    """
    scale = _effective_cores(cores)
    calib_scale = _effective_cores(_CPU_CALIB_CORES)
    # Solve the calibrated decode step for its compute part (2 threads, short context).
    calib = _SMOLLM2_135M
    step = _CPU_CALIB_GEN_BATCH / _CPU_CALIB_GEN_TOKENS_PER_S
    context = 64
    kv_bytes = _CPU_CALIB_GEN_BATCH * context * calib.num_layers * 2 * calib.kv_dim * 4
    stream = (calib.matmul_params * 4 + kv_bytes) / (_CPU_MEM_BANDWIDTH_PER_CORE * calib_scale)
    compute = step - stream - calib.num_layers * _CPU_LAYER_OVERHEAD_S
    calib_flops = _CPU_CALIB_GEN_BATCH * (2 * calib.matmul_params + 4 * calib.num_layers * calib.attn_dim * context)
    gen_per_core = calib_flops / compute / calib_scale
    train = _CPU_TRAIN_FLOPS_PER_CORE * scale
    return Hardware(
        name=name, device="cpu", peak_flops=train, fp32_flops=train, memory_bytes=memory_bytes,
        gen_flops=gen_per_core * scale, memory_bandwidth=_CPU_MEM_BANDWIDTH_PER_CORE * scale,
        layer_overhead_s=_CPU_LAYER_OVERHEAD_S, cores=cores,
    )


def gpu_hardware(name: str, *, memory_bytes: int = 0, count: int = 1) -> Hardware:
    """A CUDA device from the spec-sheet table (matched by substring of the device name), with ~40% training
    MFU, 50% decoding efficiency and 70% of spec bandwidth. Unknown GPUs get conservative T4-class numbers."""
    row = next((r for r in _GPU_TABLE if r[0].lower() in name.lower()), None)
    if row is None:
        logger.warning("GPU '%s' is not in the estimate table; using conservative numbers", name)
        row = _GPU_UNKNOWN
    _, bf16, fp32, bandwidth = row
    return Hardware(
        name=name, device="cuda", peak_flops=bf16 * _GPU_TRAIN_MFU, fp32_flops=fp32 * _GPU_TRAIN_MFU,
        memory_bytes=memory_bytes, gen_flops=bf16 * _GPU_GEN_MFU, memory_bandwidth=bandwidth * _GPU_BW_EFFICIENCY,
        layer_overhead_s=_GPU_LAYER_OVERHEAD_S, cores=count,
    )


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
    return cpu_hardware(cores, memory_bytes=_ram_bytes(), name=f"cpu ({cores} threads)")


# ----------------------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Estimated cost of one stage. ``detail`` holds the named parts (FLOPs, bytes, seconds) for display."""

    flops: float
    memory_bytes: int
    seconds: float
    detail: Mapping[str, float] = field(default_factory=dict)

    def fits(self, hardware: Hardware) -> bool:
        """Whether the estimated peak memory fits the device (unknown device memory counts as fitting)."""
        return hardware.memory_bytes <= 0 or self.memory_bytes <= hardware.memory_bytes


def _activation_elems_per_token_layer(shape: ModelShape) -> int:
    """Elements autograd keeps per token for one decoder layer (LLaMA-style block, SDPA attention):
    norm inputs/outputs, q/k/v (pre- and post-rotary), attention output, o_proj input, MLP inputs and the
    gate/up/act/product tensors."""
    attn = 6 * shape.hidden + 2 * shape.attn_dim + 4 * shape.kv_dim
    mlp = (4 if shape.gated_mlp else 2) * shape.intermediate
    return attn + mlp


def _activation_bytes(shape: ModelShape, layers_with_grad: int, micro_tokens: int, dtype_bytes: int,
                      checkpointing: bool) -> int:
    if layers_with_grad <= 0:
        return 0
    full_layer = _activation_elems_per_token_layer(shape) * micro_tokens * dtype_bytes
    if checkpointing:
        kept = layers_with_grad * shape.hidden * micro_tokens * dtype_bytes + full_layer
    else:
        kept = layers_with_grad * full_layer
    # Logits in the model dtype, their fp32 upcast for the loss, and its gradient.
    logits = micro_tokens * shape.vocab * (dtype_bytes + 8)
    return int(kept + logits)


def _state_bytes_per_param(dtype_bytes: int, master_weights: bool) -> int:
    """Bytes per *trainable* parameter beyond its weight: gradient + AdamW m, v (+ fp32 master copy)."""
    if dtype_bytes >= 4:
        return 4 + 8
    if master_weights:
        return dtype_bytes + 4 + 8
    return 3 * dtype_bytes


def _check_layers(shape: ModelShape, mask_layers: Sequence[int] | None) -> tuple[int, ...]:
    if not mask_layers:
        raise MftBenchError("estimate for arm 'mft' needs mask_layers (the band of decoder layers to mask)")
    layers = tuple(sorted({int(i) for i in mask_layers}))
    if layers[0] < 0 or layers[-1] >= shape.num_layers:
        raise MftBenchError(
            f"mask layers {list(layers)} are outside the model's {shape.num_layers} layers (0..{shape.num_layers - 1})"
        )
    return layers


def estimate_training(
    shape: ModelShape,
    arm: str,
    tokens: int,
    *,
    hardware: Hardware,
    dtype_bytes: int = 4,
    mask_layers: Sequence[int] | None = None,
    lora_r: int = 64,
    gradient_checkpointing: bool = False,
    micro_batch_tokens: int = 4096,
    seq_len: int = 512,
    tokens_per_step: int | None = None,
    master_weights: bool = False,
) -> Estimate:
    """FLOPs, peak memory and seconds to train ``arm`` ("fft", "mft", "lora") on ``tokens`` tokens.

    ``micro_batch_tokens``: tokens in one forward/backward (sets activation memory); ``seq_len``: sequence
    length (sets the attention term); ``tokens_per_step``: tokens per optimizer step (effective batch; default
    one micro-batch) -- it sets how often AdamW and MFT's mask selection run. See the module docstring for
    the formulas and the precision settings.
    """
    if arm not in ARMS:
        raise MftBenchError(f"unknown training arm '{arm}'; choose one of {', '.join(ARMS)}")
    if tokens < 0 or micro_batch_tokens <= 0 or seq_len <= 0:
        raise MftBenchError("estimate_training: tokens must be >= 0, micro_batch_tokens and seq_len > 0")
    n = shape.matmul_params
    layers = shape.num_layers
    attn_fwd = 4 * layers * shape.attn_dim * seq_len  # per token
    steps = math.ceil(tokens / (tokens_per_step or micro_batch_tokens)) if tokens else 0
    micro_batches = math.ceil(tokens / micro_batch_tokens) if tokens else 0
    bw = hardware.memory_bandwidth
    weights = shape.n_params * dtype_bytes
    per_step_s = 0.0
    per_micro_s = 0.0

    if arm == "fft":
        flops_per_token = 6 * n + 3 * attn_fwd
        trainable = shape.n_params
        state = trainable * _state_bytes_per_param(dtype_bytes, master_weights)
        acts = _activation_bytes(shape, layers, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        per_step_s = _ADAMW_PASSES * trainable * (dtype_bytes + _state_bytes_per_param(dtype_bytes, master_weights)) / bw
        detail = {"trainable_params": trainable}
    elif arm == "mft":
        band = _check_layers(shape, mask_layers)
        layers_above = layers - band[0]
        n_above = layers_above * shape.linear_weights_per_layer + shape.vocab * shape.hidden
        n_masked = len(band) * shape.linear_weights_per_layer
        flops_per_token = (2 * n + attn_fwd) + (2 * n_above + 2 * attn_fwd * layers_above / layers) + 2 * n_masked
        trainable = n_masked
        # Scores, their grads, AdamW m and v: all fp32, plus the cached bool mask per masked matrix (W*mask is
        # rebuilt in backward rather than kept, so it is only a transient of one matrix).
        state = n_masked * 16 + n_masked
        acts = _activation_bytes(shape, layers_above, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        per_step_s = (_ADAMW_PASSES * n_masked * 16 + _MASK_SELECT_PASSES * n_masked * 4) / bw
        per_micro_s = _MASK_APPLY_PASSES * n_masked * dtype_bytes / bw
        detail = {"trainable_params": trainable, "masked_params": n_masked, "backward_layers": layers_above,
                  "lowest_masked_layer": band[0]}
    else:  # lora on every linear of every layer
        in_out = (shape.hidden + shape.attn_dim) * 2 + (shape.hidden + shape.kv_dim) * 2
        in_out += (3 if shape.gated_mlp else 2) * (shape.hidden + shape.intermediate)
        n_lora = layers * lora_r * in_out
        flops_per_token = (2 * n + attn_fwd) + (2 * n + 2 * attn_fwd) + 6 * n_lora
        trainable = n_lora
        # Adapters are fp32 with fp32 grads and AdamW states (peft's default), 16 bytes each.
        state = n_lora * 16
        acts = _activation_bytes(shape, layers, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        acts += 0 if gradient_checkpointing else layers * micro_batch_tokens * lora_r * 7 * dtype_bytes
        per_step_s = _ADAMW_PASSES * n_lora * 16 / bw
        detail = {"trainable_params": trainable, "lora_params": n_lora}

    flops = flops_per_token * tokens
    if gradient_checkpointing:
        # Recomputing the forward of every layer that keeps activations: one extra forward's worth.
        grad_layers = detail.get("backward_layers", layers)
        flops += (2 * n * grad_layers / layers + attn_fwd * grad_layers / layers) * tokens
    compute_s = flops / hardware.train_flops(dtype_bytes)
    overhead_s = steps * per_step_s + micro_batches * per_micro_s
    memory = int(weights + state + acts)
    detail = {**detail, "flops_per_token": flops_per_token, "optimizer_steps": steps, "compute_s": compute_s,
              "overhead_s": overhead_s, "weights_bytes": weights, "state_bytes": state, "activation_bytes": acts}
    return Estimate(flops=float(flops), memory_bytes=memory, seconds=compute_s + overhead_s,
                    detail=MappingProxyType(detail))


def estimate_generation(
    shape: ModelShape,
    *,
    prompt_tokens: int,
    new_tokens: int,
    sequences: int,
    batch_size: int,
    hardware: Hardware,
    dtype_bytes: int = 4,
    shared_prompt_tokens: int = 0,
) -> Estimate:
    """Cost of generating ``new_tokens`` for each of ``sequences`` prompts of ``prompt_tokens`` tokens (greedy,
    KV cache, batches of ``batch_size``; every sequence assumed to run the full ``new_tokens``, an upper bound
    when generation stops at EOS). ``shared_prompt_tokens`` of each prompt are common to all (few-shot
    exemplars): the ``hf`` backend prefills them once per batch and decode steps read their keys/values once
    per batch, not once per row.

    Prefill is compute-bound: ``2N`` per prompt token (LM head on the last position only) plus attention. Each decode step costs the larger of
    ``2N * batch`` FLOPs and streaming the weights and KV cache (GPU; on CPU they add), plus a per-layer
    overhead. Memory: weights + KV cache + fp32 logits of one batch.
    """
    if min(prompt_tokens, new_tokens, sequences) < 0 or batch_size <= 0:
        raise MftBenchError("estimate_generation: token counts must be >= 0 and batch_size > 0")
    n = shape.matmul_params
    batches = math.ceil(sequences / batch_size) if sequences else 0
    # generate() computes LM-head logits for the last prompt position only.
    body = n - shape.vocab * shape.hidden
    shared = min(max(shared_prompt_tokens, 0), prompt_tokens)
    per_token = 2 * body + 2 * shape.num_layers * shape.attn_dim * prompt_tokens
    prefill_flops = (sequences * (prompt_tokens - shared) + batches * shared) * per_token
    prefill_flops += sequences * 2 * shape.vocab * shape.hidden
    prefill_s = prefill_flops / hardware.gen_flops + batches * shape.num_layers * hardware.layer_overhead_s
    # keys/values a row streams per decode step: its own columns plus its share of the prefix read once per batch
    mid_context = prompt_tokens - shared + new_tokens // 2 + shared // max(min(batch_size, sequences), 1)
    decode_flops = sequences * new_tokens * (2 * n + 4 * shape.num_layers * shape.attn_dim * mid_context)
    decode_s = 0.0
    for start in range(0, sequences, batch_size):
        batch = min(batch_size, sequences - start)
        decode_s += new_tokens * hardware.decode_step_seconds(shape, batch_size=batch, context=mid_context,
                                                              dtype_bytes=dtype_bytes)
    batch = min(batch_size, max(sequences, 1))
    kv = batch * (prompt_tokens + new_tokens) * shape.num_layers * 2 * shape.kv_dim * dtype_bytes
    logits = 2 * batch * shape.vocab * 4  # only the last position's logits (and processed scores) are kept
    memory = shape.n_params * dtype_bytes + kv + logits
    detail = {"prefill_s": prefill_s, "decode_s": decode_s, "kv_cache_bytes": kv,
              "decode_tokens_per_s": sequences * new_tokens / decode_s if decode_s else 0.0}
    return Estimate(flops=float(prefill_flops + decode_flops), memory_bytes=int(memory), seconds=prefill_s + decode_s,
                    detail=MappingProxyType(detail))


def estimate_load(shape: ModelShape, *, hardware: Hardware, gguf: bool = False, dtype_bytes: int = 4) -> Estimate:
    """Time and memory to load the model: GGUF files are dequantized by transformers in Python/numpy
    (calibrated: SmolLM2-135M ~20 s, single-threaded, peak ~2x the dense weights); other checkpoints are read at
    ~1 GB/s. On CUDA the weights are then copied to the device."""
    weight_bytes = shape.n_params * dtype_bytes
    if gguf:
        # Dequantisation runs on the host CPU whatever the device.
        seconds = _LOAD_FIXED_S + shape.n_params / _GGUF_PARAMS_PER_S
        memory = 2 * weight_bytes
    else:
        seconds = _LOAD_FIXED_S + weight_bytes / _DISK_BYTES_PER_S
        memory = weight_bytes
    if hardware.device == "cuda":
        seconds += weight_bytes / _H2D_BYTES_PER_S
    return Estimate(flops=0.0, memory_bytes=int(memory), seconds=seconds,
                    detail=MappingProxyType({"weights_bytes": weight_bytes}))
