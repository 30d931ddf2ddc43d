"""Where the decoder layers and their maskable projections live, per architecture.

A small table keyed on ``model.config.model_type`` gives the path of the decoder-layer list and the default
projections; unknown architectures fall back to the ``nn.ModuleList`` holding ``num_hidden_layers`` blocks and,
for defaults, the seven Llama projections when present, else every maskable linear module of the layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchLayout:
    layers_path: str
    default_modules: tuple[str, ...]


_LLAMA_LIKE = ArchLayout("model.layers", LLAMA_PROJECTIONS)

ARCHITECTURES: dict[str, ArchLayout] = {
    **{
        t: _LLAMA_LIKE
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3")
    },
    "gpt_neox": ArchLayout(
        "gpt_neox.layers",
        ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ),
    "gpt2": ArchLayout("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}


def is_maskable(module: nn.Module) -> bool:
    """A plain linear projection: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored transposed, (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is nn.Linear or isinstance(module, Conv1D)


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in_features, out_features) (GPT-2 ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, key, None)
        if isinstance(value, int):
            return value
    return None


def layers_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer ``ModuleList`` inside ``model``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = ARCHITECTURES.get(model_type)
    if layout is not None:
        try:
            model.get_submodule(layout.layers_path)
            return layout.layers_path
        except AttributeError:
            logger.debug("model_type %s without %s; searching for the layer list", model_type, layout.layers_path)
    wanted = _num_layers(model)
    candidates = [
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (wanted is None or len(mod) == wanted)
    ]
    if not candidates:
        raise MftBenchError(
            f"mask: cannot find the decoder layers of model_type '{model_type}'; "
            "add its layout to mft_bench.masking.architectures.ARCHITECTURES"
        )
    return min(candidates, key=lambda n: n.count("."))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layers_path(model))


def maskable_module_names(model: nn.Module, layer: int) -> list[str]:
    """Names, relative to decoder layer ``layer``, of every module that can be masked (e.g. ``self_attn.q_proj``)."""
    layers = decoder_layers(model)
    _check_layer(layers, layer)
    return [name for name, mod in layers[layer].named_modules() if name and is_maskable(_unwrapped(mod))]


def default_modules(model: nn.Module) -> list[str]:
    """The architecture's default projections to mask (short names as accepted by ``recipe.MaskSpec.modules``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return list(ARCHITECTURES[model_type].default_modules)
    available = maskable_module_names(model, 0)
    if all(_match(p, available) for p in LLAMA_PROJECTIONS):
        return list(LLAMA_PROJECTIONS)
    logger.info("model_type %s has no mask defaults; masking every linear module of the layer", model_type)
    return available


def short_names(names: list[str]) -> list[str]:
    """Shortest dotted suffix of each name that is unique among ``names`` (``self_attn.q_proj`` -> ``q_proj``)."""
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[i:])
            if sum(1 for n in names if n == suffix or n.endswith("." + suffix)) == 1:
                out.append(suffix)
                break
        else:
            out.append(name)
    return out


def _match(pattern: str, available: list[str]) -> list[str]:
    return [n for n in available if n == pattern or n.endswith("." + pattern)]


def _check_layer(layers: nn.ModuleList, layer: int) -> None:
    if not 0 <= layer < len(layers):
        raise MftBenchError(f"mask.layers: layer {layer} out of range, model has {len(layers)} layers")


def _unwrapped(module: nn.Module) -> nn.Module:
    # A MaskedLinear wrapper stands for the module it wraps.
    return getattr(module, "base_module", module)


def resolve_targets(model: nn.Module, layers: list[int], modules: list[str] | None) -> list[str]:
    """Full module names (``model.layers.2.self_attn.q_proj``) for the given layers and module patterns.

    A pattern matches a module whose layer-relative name equals it or ends with ``.<pattern>``; a pattern that
    matches nothing or more than one module is an error naming the alternatives.
    """
    path = layers_path(model)
    layer_list = model.get_submodule(path)
    patterns = modules if modules is not None else default_modules(model)
    targets: list[str] = []
    for layer in layers:
        _check_layer(layer_list, layer)
        available = maskable_module_names(model, layer)
        for pattern in patterns:
            found = _match(pattern, available)
            if not found:
                raise MftBenchError(
                    f"mask.modules: no module '{pattern}' in layer {layer}; "
                    f"available: {', '.join(short_names(available))}"
                )
            if len(found) > 1:
                raise MftBenchError(
                    f"mask.modules: '{pattern}' is ambiguous in layer {layer} ({', '.join(found)}); "
                    "use the qualified name"
                )
            full = f"{path}.{layer}.{found[0]}"
            if full not in targets:
                targets.append(full)
    return targets
