"""The dimensions of a decoder-only transformer that its cost depends on, read from a transformers config or a
table of known backbones (no download)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)


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
})


def shape_for_backbone(name: str) -> ModelShape | None:
    """The shape of a backbone by name, without network: a :data:`KNOWN_SHAPES` entry (case-insensitive), a tiny
    test model (``tiny:<arch>``, read from the config ``backbone.tiny_config`` builds), or a local folder's
    ``config.json``. ``None`` if unknown (the plan then shows no estimate for it)."""
    if name.startswith("tiny:"):
        from mft_bench.backbone import TINY_ARCHS, tiny_config

        arch = name.split(":", 1)[1]
        return ModelShape.from_config(tiny_config(arch)) if arch in TINY_ARCHS else None
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
