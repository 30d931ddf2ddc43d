"""Cost estimates (FLOPs, memory, seconds) for the stages ``mft-bench plan`` shows before anything runs.

Everything here is closed-form arithmetic on a :class:`ModelShape` (``model_shape.py``) and a :class:`Hardware`
description (``hardware.py``, where the utilisation constants are calibrated); no model is built and nothing
touches the network. The numbers are meant to be right within ~2x, which ``benchmarks/plan_accuracy.py`` checks
on the machine at hand; memory within 25% of the measured H200 anchors (``tests/test_cost.py``).

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
- Precision of persistent state (``dtype_bytes`` is the backbone's dtype, which is also the compute dtype):
  ``dtype_bytes=4`` is plain fp32 training (weights, grads, AdamW m and v all fp32: 16 bytes/param).
  ``dtype_bytes=2`` alone is *pure* bf16 -- weights, grads and AdamW states all bf16 (8 bytes/param); this is
  what reproduces the measured H200 memory. ``master_weights=True`` is mixed precision as ``train/precision.py``
  does it (the paper recipes' setting): the trained weights are kept in fp32 with fp32 grads and AdamW states
  (16 bytes/param), and autocast holds a bf16 copy of each trained weight from its cast in the forward until
  the forward ends (2 more): 18 bytes/param for FFT, e.g. ~113 GiB of state for LLaMA-2-7B against ~50 GiB in
  pure bf16. Frozen weights (MFT's model, LoRA's base) stay in the backbone's dtype. MFT scores, their
  gradients and their AdamW states are always fp32 (the official code creates the scores as fp32 parameters).
- Time = FLOPs / effective FLOP/s + per-optimizer-step memory-bound work (AdamW update, mask selection) +
  per-micro-batch memory-bound work (MFT's mask application; mixed precision's weight casts and fp32 gradient
  accumulation). The effective FLOP/s already contains the utilisation (MFU).
- Several processes (``per_device_memory``): ``ddp`` keeps a whole replica per process plus DDP's gradient
  buckets (a second copy of the gradients, torch's default ``gradient_as_bucket_view=False``); ``fsdp`` divides
  weights, gradients and optimizer states by the process count and adds one micro-batch's activations and the
  layers gathered at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

from mft_bench.arms import REGISTRY
from mft_bench.errors import MftBenchError
from mft_bench.hardware import Hardware, cpu_hardware, detect_hardware, gpu_hardware, hardware_by_name
from mft_bench.model_shape import KNOWN_SHAPES, ModelShape, shape_for_backbone

__all__ = [
    "GIB", "TRAINERS", "KNOWN_SHAPES", "Estimate", "Hardware", "ModelShape", "cpu_hardware", "detect_hardware",
    "estimate_generation", "estimate_load", "estimate_training", "gpu_hardware", "hardware_by_name",
    "data_parallel_seconds", "per_device_memory", "shape_for_backbone", "DDP_EFFICIENCY", "FSDP_EFFICIENCY",
    "DISK_BYTES_PER_S",
]

# the training methods the cost model prices: every trained arm is priced as its arms.Arm.trainer
TRAINERS: tuple[str, ...] = tuple(dict.fromkeys(arm.trainer for arm in REGISTRY if arm.trainer))
GIB = 1024**3

# Model loading: GGUF is dequantized in Python/numpy by transformers (SmolLM2-135M: ~20 s on 2 cores,
# of which a few seconds are tokenizer conversion); plain safetensors are read at disk speed.
_GGUF_PARAMS_PER_S = 8e6  # numpy dequantisation is effectively single-threaded: does not scale with cores
_LOAD_FIXED_S = 3.0
DISK_BYTES_PER_S = 1e9  # reading or writing model files (safetensors), effective
_H2D_BYTES_PER_S = 20e9
_MASK_SELECT_PASSES = 8  # |s|, kthvalue/topk (several passes), compare, cast: ~8 reads/writes of 4 bytes
_MASK_APPLY_PASSES = 6  # per micro-batch: W*mask forward, grad_W_eff*W*sign(s) backward
_ADAMW_PASSES = 5  # AdamW: ~5 kernels' worth of reads/writes of parameter-sized tensors
# Training on N GPUs of one node: DDP all-reduces once per optimizer step (accumulation steps run without
# communication), FSDP gathers every layer's weights for each micro-batch's forward and backward and
# reduce-scatters its gradients; both overlap most of it with compute. Assumed, not measured.
DDP_EFFICIENCY = 0.9
FSDP_EFFICIENCY = 0.8


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


@dataclass(frozen=True)
class _Precision:
    """Bytes per trained parameter: its stored weight, gradient, AdamW m + v, and the transient compute copy."""

    weight: int
    grad: int
    optimizer: int
    cast: int


def _precision(dtype_bytes: int, master_weights: bool) -> _Precision:
    if dtype_bytes >= 4:
        return _Precision(4, 4, 8, 0)
    if master_weights:  # fp32 master + autocast's compute-dtype copy, held until the forward ends
        return _Precision(4, 4, 8, dtype_bytes)
    return _Precision(dtype_bytes, dtype_bytes, 2 * dtype_bytes, 0)


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
    """FLOPs, peak memory and seconds to train ``arm`` ("fft", "mft", "lora") on ``tokens`` tokens, one process.

    ``micro_batch_tokens``: tokens in one forward/backward (sets activation memory); ``seq_len``: sequence
    length (sets the attention term); ``tokens_per_step``: tokens per optimizer step (effective batch; default
    one micro-batch) -- it sets how often AdamW and MFT's mask selection run. ``master_weights``: mixed
    precision (see the module docstring for the formulas and the precision settings).
    """
    if arm not in TRAINERS:
        raise MftBenchError(f"unknown training arm '{arm}'; choose one of {', '.join(TRAINERS)}")
    if tokens < 0 or micro_batch_tokens <= 0 or seq_len <= 0:
        raise MftBenchError("estimate_training: tokens must be >= 0, micro_batch_tokens and seq_len > 0")
    n = shape.matmul_params
    layers = shape.num_layers
    attn_fwd = 4 * layers * shape.attn_dim * seq_len  # per token
    steps = math.ceil(tokens / (tokens_per_step or micro_batch_tokens)) if tokens else 0
    micro_batches = math.ceil(tokens / micro_batch_tokens) if tokens else 0
    bw = hardware.memory_bandwidth
    forwards = 2 if gradient_checkpointing else 1  # the recomputation is a second forward
    per_micro_s = 0.0

    if arm == "fft":
        flops_per_token = 6 * n + 3 * attn_fwd
        trainable = shape.n_params
        p = _precision(dtype_bytes, master_weights)
        weights = trainable * p.weight
        grads, optimizer, cast = trainable * p.grad, trainable * p.optimizer, trainable * p.cast
        acts = _activation_bytes(shape, layers, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        per_step_s = _ADAMW_PASSES * trainable * (p.weight + p.grad + p.optimizer) / bw
        if p.cast:  # each forward casts the fp32 weights; each backward adds its gradient into the fp32 one
            per_micro_s = trainable * ((4 + p.cast) * forwards + p.cast + 8) / bw
        checkpoint = trainable * (p.weight + p.optimizer)
        detail = {"trainable_params": trainable}
    elif arm == "mft":
        band = _check_layers(shape, mask_layers)
        layers_above = layers - band[0]
        n_above = layers_above * shape.linear_weights_per_layer + shape.vocab * shape.hidden
        n_masked = len(band) * shape.linear_weights_per_layer
        flops_per_token = (2 * n + attn_fwd) + (2 * n_above + 2 * attn_fwd * layers_above / layers) + 2 * n_masked
        trainable = n_masked
        # Frozen weights in the backbone's dtype; the fp32 scores are the trained tensors, with fp32 grads and
        # AdamW m and v, plus the cached bool mask per masked matrix (W*mask is rebuilt in backward rather than
        # kept, so it is only a transient of one matrix).
        weights = shape.n_params * dtype_bytes + n_masked * 4
        grads, optimizer, cast = n_masked * 4, n_masked * 8 + n_masked, 0
        acts = _activation_bytes(shape, layers_above, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        per_step_s = (_ADAMW_PASSES * n_masked * 16 + _MASK_SELECT_PASSES * n_masked * 4) / bw
        per_micro_s = _MASK_APPLY_PASSES * n_masked * dtype_bytes / bw
        checkpoint = n_masked * 12  # a resume checkpoint holds the scores and their AdamW states only
        detail = {"trainable_params": trainable, "masked_params": n_masked, "backward_layers": layers_above,
                  "lowest_masked_layer": band[0]}
    else:  # lora on every linear of every layer
        in_out = (shape.hidden + shape.attn_dim) * 2 + (shape.hidden + shape.kv_dim) * 2
        in_out += (3 if shape.gated_mlp else 2) * (shape.hidden + shape.intermediate)
        n_lora = layers * lora_r * in_out
        flops_per_token = (2 * n + attn_fwd) + (2 * n + 2 * attn_fwd) + 6 * n_lora
        trainable = n_lora
        # Frozen base in the backbone's dtype; adapters fp32 with fp32 grads and AdamW states (peft's default,
        # and what mixed precision keeps), 16 bytes each.
        weights = shape.n_params * dtype_bytes + n_lora * 4
        grads, optimizer, cast = n_lora * 4, n_lora * 8, 0
        acts = _activation_bytes(shape, layers, micro_batch_tokens, dtype_bytes, gradient_checkpointing)
        acts += 0 if gradient_checkpointing else layers * micro_batch_tokens * lora_r * 7 * dtype_bytes
        per_step_s = _ADAMW_PASSES * n_lora * 16 / bw
        checkpoint = n_lora * 12  # peft saves the adapters only, with their AdamW states
        detail = {"trainable_params": trainable, "lora_params": n_lora}

    flops = flops_per_token * tokens
    if gradient_checkpointing:
        # Recomputing the forward of every layer that keeps activations: one extra forward's worth.
        grad_layers = detail.get("backward_layers", layers)
        flops += (2 * n * grad_layers / layers + attn_fwd * grad_layers / layers) * tokens
    compute_s = flops / hardware.train_flops(dtype_bytes)
    optimizer_s, micro_s = steps * per_step_s, micro_batches * per_micro_s
    state = grads + optimizer
    memory = int(weights + state + cast + acts)
    detail = {**detail, "flops_per_token": flops_per_token, "optimizer_steps": steps, "compute_s": compute_s,
              "optimizer_s": optimizer_s, "micro_batch_s": micro_s, "overhead_s": optimizer_s + micro_s,
              "weights_bytes": weights, "grad_bytes": grads, "optimizer_bytes": optimizer, "state_bytes": state,
              "cast_bytes": cast, "activation_bytes": acts, "checkpoint_bytes": checkpoint}
    return Estimate(flops=float(flops), memory_bytes=memory, seconds=compute_s + optimizer_s + micro_s,
                    detail=MappingProxyType(detail))


def data_parallel_seconds(estimate: Estimate, *, strategy: str, world_size: int, hardware: Hardware) -> float:
    """Wall seconds of a :func:`estimate_training` result on ``world_size`` GPUs. Each process computes
    ``1/world_size`` of the micro-batches at :data:`DDP_EFFICIENCY` / :data:`FSDP_EFFICIENCY`; DDP repeats the
    optimizer step on every process, FSDP divides it. CPU processes share one machine's cores: no speed-up."""
    if world_size <= 1 or hardware.device == "cpu":
        return estimate.seconds
    d = estimate.detail
    if strategy == "fsdp":
        return (d["compute_s"] + d["micro_batch_s"]) / (world_size * FSDP_EFFICIENCY) + d["optimizer_s"] / world_size
    return d["compute_s"] / (world_size * DDP_EFFICIENCY) + d["micro_batch_s"] / world_size + d["optimizer_s"]


def per_device_memory(estimate: Estimate, shape: ModelShape, *, strategy: str, world_size: int,
                      dtype_bytes: int) -> dict[str, int]:
    """Peak memory of one of ``world_size`` training processes, by part, for a :func:`estimate_training` result.

    ``ddp``: the whole replica, plus DDP's gradient buckets when there are several processes. ``fsdp`` (FFT):
    weights, gradients and AdamW states divided by ``world_size``; one micro-batch's activations; the layers
    gathered at a time in ``dtype_bytes`` (the one computing, the one prefetched, its unsharded gradient) plus the
    root unit (embeddings, final norm, LM head), which stays gathered. Autocast makes no extra copies there: FSDP
    casts while gathering.
    """
    d = estimate.detail
    if strategy == "fsdp":
        size = max(world_size, 1)
        root = shape.n_params - shape.num_layers * shape.params_per_layer
        return {"sharded state": int((d["weights_bytes"] + d["state_bytes"]) / size),
                "activations": int(d["activation_bytes"]),
                "gathered layers": int((3 * shape.params_per_layer + root) * dtype_bytes)}
    parts = {"replica": int(estimate.memory_bytes)}
    if world_size > 1:
        parts["gradient buckets"] = int(d["grad_bytes"])
    return parts


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
    prefill_s = prefill_flops / hardware.generation_flops(dtype_bytes) + batches * shape.num_layers * hardware.layer_overhead_s
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
        seconds = _LOAD_FIXED_S + weight_bytes / DISK_BYTES_PER_S
        memory = weight_bytes
    if hardware.device == "cuda":
        seconds += weight_bytes / _H2D_BYTES_PER_S
    return Estimate(flops=0.0, memory_bytes=int(memory), seconds=seconds,
                    detail=MappingProxyType({"weights_bytes": weight_bytes}))
