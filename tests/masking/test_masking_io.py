"""Masking core: baselines, bit-packed mask files, base-hash refusal, dense export, statistics."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from torch import nn

from mft_bench.backbone import TINY_ARCHS, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.masking import (
    MaskedLinear,
    apply_masks,
    attach_masks,
    baseline_masks,
    bits_per_weight,
    current_masks,
    export_dense,
    load_masks,
    mask_overlap,
    mask_parameters,
    mask_statistics,
    read_mask_metadata,
    removed_counts,
    save_masks,
)
from mft_bench.masking.baselines import l1_rows_removed
from mft_bench.recipe import MaskSpec

VOCAB = 64


def _model(arch: str = "llama", seed: int = 0) -> nn.Module:
    return tiny_model(arch, vocab_size=VOCAB, num_layers=3, seed=seed)


def _trained_masks(model: nn.Module, spec: MaskSpec) -> dict:
    """Attach and take one large optimizer step so the masks are not just their initial state."""
    attach_masks(model, spec)
    ids = torch.randint(0, VOCAB - 3, (2, 10), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(mask_parameters(model), lr=100.0).step()
    return current_masks(model)


# ---------------------------------------------------------------- baselines

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_baselines_match_counts_and_definitions(arch):
    model = _model(arch)
    spec = MaskSpec(layers=[0, 2], mask_ratio=0.25)
    rand = baseline_masks(model, spec, kind="random", seed=0)
    mag = baseline_masks(model, spec, kind="magnitude")
    names = attach_masks(_model(arch), spec)
    assert list(rand) == list(mag) == names
    for name in names:
        weight = model.get_submodule(name).weight.detach().abs()
        for masks in (rand, mag):
            assert masks[name].shape == weight.shape and masks[name].dtype == torch.bool
            assert int((~masks[name]).sum()) == round(0.25 * weight.numel())
        assert weight[~mag[name]].max() <= weight[mag[name]].min()
    assert all(torch.equal(rand[n], baseline_masks(model, spec, "random", seed=0)[n]) for n in names)
    assert not all(torch.equal(rand[n], baseline_masks(model, spec, "random", seed=1)[n]) for n in names)
    assert mask_overlap(rand, mag) < 0.9


def test_baselines_copy_given_removed_counts_and_work_on_wrapped_model():
    model = _model("llama")
    spec = MaskSpec(layers=[1], mask_ratio=0.2, mode="global-abs-exact", init="magnitude")
    mft = _trained_masks(model, spec)
    counts = removed_counts(mft)
    for kind in ("random", "magnitude"):
        masks = baseline_masks(model, spec, kind=kind, removed_counts=counts)
        assert removed_counts(masks) == counts
    with pytest.raises(MftBenchError, match="kind"):
        baseline_masks(model, spec, kind="snip")


def _official_l1_masks(model: nn.Module, masked_layers: list[int], sparsity: float) -> dict:
    """The official L1 rule, re-implemented directly from ``generate_l1_masks`` in ``scripts/apply_masks.py`` at
    Ming-K9/MFT d1d7a72 (subnet_mode ``both``, ``sparsity`` = the kept fraction): every ``self_attn``/``mlp``
    parameter of a masked layer, score = mean |W| over dim 1, the ``min(int((1 - sparsity) * n), n - 1)`` rows
    of smallest score set to 0, the row mask expanded over the parameter."""
    masks = {}
    for name, param in model.named_parameters():
        if any(part in name for part in ("wte", "embed", "lm_head", "norm")):
            continue
        try:
            layer = int(name.split(".")[2])
        except (IndexError, ValueError):
            continue
        if layer not in masked_layers or not ("self_attn" in name or "mlp" in name):
            continue
        score = param.abs().mean(dim=1)
        n_pruned = min(int((1 - sparsity) * len(score)), len(score) - 1)
        mask = torch.ones_like(score)
        mask[score.sort()[1][:n_pruned]] = 0
        masks[name[:-7] if name.endswith(".weight") else name] = mask.view(-1, 1).expand_as(param)
    return masks


@pytest.mark.parametrize("mask_ratio", [0.1, 0.3])
def test_l1_rows_baseline_equals_the_official_structured_l1_mask(mask_ratio):
    model = _model("llama")
    spec = MaskSpec(layers=[0, 2], mask_ratio=mask_ratio)
    ours = baseline_masks(model, spec, kind="l1_rows")
    with torch.no_grad():
        official = _official_l1_masks(model, [0, 2], sparsity=round(1 - mask_ratio, 10))  # the config's 0.9 / 0.7
    assert list(ours) == list(official) and len(ours) == 14  # 7 projections x 2 layers
    for name, mask in ours.items():
        assert mask.dtype == torch.bool and torch.equal(mask, official[name].bool()), name
        assert bool((mask.all(dim=1) | ~mask.any(dim=1)).all()), "whole output rows kept or removed"
        removed_rows = int((~mask.all(dim=1)).sum())
        rows = mask.shape[0]
        assert removed_rows == l1_rows_removed(rows, mask_ratio)
    # the official count truncates (1 - 0.9) * rows = 0.0999...98 * rows: k_proj's 16 rows lose 1, not round(1.6)
    k_rows = ours["model.layers.0.self_attn.k_proj"].all(dim=1)
    assert mask_ratio != 0.1 or int((~k_rows).sum()) == 1
    assert l1_rows_removed(4096, 0.1) == 409 and l1_rows_removed(11008, 0.1) == 1100  # LLaMA-2-7B's matrices
    # and the removed rows are those of smallest mean |W|
    weight = model.get_submodule("model.layers.2.mlp.down_proj").weight.detach().abs().mean(dim=1)
    kept = ours["model.layers.2.mlp.down_proj"].all(dim=1)
    assert weight[~kept].max() < weight[kept].min()


def test_l1_rows_on_wrapped_and_transposed_models():
    spec = MaskSpec(layers=[1], mask_ratio=0.25)
    plain = baseline_masks(_model("llama"), spec, kind="l1_rows")
    wrapped = _model("llama")
    attach_masks(wrapped, spec)
    assert all(torch.equal(plain[n], m) for n, m in baseline_masks(wrapped, spec, kind="l1_rows").items())
    gpt2 = _model("gpt2")  # Conv1D stores (in, out): whole output columns go
    for name, mask in baseline_masks(gpt2, spec, kind="l1_rows").items():
        assert bool((mask.all(dim=0) | ~mask.any(dim=0)).all()), name
        assert int((~mask.all(dim=0)).sum()) == l1_rows_removed(mask.shape[1], 0.25)
    with pytest.raises(MftBenchError, match="l1_rows.*removed_counts"):
        baseline_masks(_model("llama"), spec, kind="l1_rows", removed_counts={})


# ---------------------------------------------------------------- mask files

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_load_roundtrip_is_identity_and_refuses_other_base(arch, tmp_path):
    model = _model(arch)
    masks = _trained_masks(model, MaskSpec(layers=[1, 2], mask_ratio=0.1))
    path = save_masks(masks, tmp_path / "mask.safetensors", base_model=model)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]  # atomic: no temp file left behind
    loaded = load_masks(path, base_model=model)
    assert list(loaded) == list(masks)
    assert all(torch.equal(loaded[n], masks[n]) and loaded[n].dtype == torch.bool for n in masks)
    assert all(torch.equal(load_masks(path)[n], masks[n]) for n in masks)  # no model: no hash check
    meta = read_mask_metadata(path)
    assert meta["modules"] == list(masks) and meta["mask_ratio"] == 0.1 and len(meta["base_hash"]) == 64
    assert meta["shapes"] == {n: tuple(m.shape) for n, m in masks.items()}
    assert meta["removed"] == removed_counts(masks)
    with pytest.raises(MftBenchError, match="was made for another base model"):
        load_masks(path, base_model=_model(arch, seed=1))


def test_hash_sees_a_single_changed_weight_and_applied_zeros(tmp_path):
    model = _model("qwen2")
    masks = _trained_masks(model, MaskSpec(layers=[0]))
    path = save_masks(masks, tmp_path / "m.safetensors", base_model=model)
    other = _model("qwen2")
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    with pytest.raises(MftBenchError, match=r"mask file .*m\.safetensors was made for another base model \(hash"):
        load_masks(path, base_model=other)
    assert load_masks(path, base_model=_model("qwen2"))  # a fresh identical base passes
    apply_masks(model, masks)
    with pytest.raises(MftBenchError, match="another base model"):
        load_masks(path, base_model=model)


def test_mask_file_errors_are_user_errors(tmp_path):
    with pytest.raises(MftBenchError, match="not found"):
        load_masks(tmp_path / "missing.safetensors")
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(MftBenchError, match="bogus.safetensors"):
        read_mask_metadata(bogus)
    model = _model("llama")
    masks = _trained_masks(model, MaskSpec(layers=[0]))
    path = save_masks(masks, tmp_path / "m.safetensors", base_model=model)
    with pytest.raises(MftBenchError, match="does not exist|weight shape"):
        load_masks(path, base_model=_model("gpt2"))


def test_bits_per_masked_weight_all_included(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    masks = baseline_masks(model, MaskSpec(layers=[0, 1]), kind="random")
    path = save_masks(masks, tmp_path / "m.safetensors", base_model=model)
    numel = sum(m.numel() for m in masks.values())
    assert numel > 1_000_000
    bits = path.stat().st_size * 8 / numel
    assert bits == pytest.approx(bits_per_weight(path))
    assert 1.0 <= bits <= 1.01


# ---------------------------------------------------------------- dense export

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_exported_dense_model_reproduces_wrapped_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(arch)
    masks = _trained_masks(model, MaskSpec(layers=[0, 2], mask_ratio=0.3))
    model.eval()
    ids = torch.randint(0, VOCAB - 3, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        wrapped_logits = model(input_ids=ids).logits
    export_dense(model, masks, tmp_path / "dense")
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    assert not any(k.endswith(".scores") for k in model.state_dict())
    assert (tmp_path / "dense" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        dense_logits = loaded(input_ids=ids).logits
    assert (dense_logits - wrapped_logits).abs().max().item() <= 1e-5
    for name, mask in masks.items():
        weight = loaded.get_submodule(name).weight
        assert bool((weight[~mask] == 0).all())
        assert int((weight[mask] == 0).sum()) == 0


def test_apply_keeps_dtype_and_works_on_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model("mistral").to(torch.bfloat16)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = MaskSpec(layers=[1])
    masks = baseline_masks(model, spec, kind="magnitude")
    export_dense(model, masks, tmp_path / "bf16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in masks:
            assert torch.equal(param, reference[name] * masks[module])
        else:
            assert torch.equal(param, reference[name]), name
    with pytest.raises(MftBenchError, match="weight shape"):
        apply_masks(model, {"model.layers.1.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)})


# ---------------------------------------------------------------- statistics

def test_statistics_and_overlap():
    a = {"model.layers.4.self_attn.q_proj": torch.tensor([[True, False], [False, True]]),
         "model.layers.5.mlp.down_proj": torch.tensor([True, True, False, True])}
    b = {"model.layers.4.self_attn.q_proj": torch.tensor([[True, False], [True, False]]),
         "model.layers.5.mlp.down_proj": torch.tensor([True, True, True, True])}
    rows = mask_statistics(a)
    assert rows[0] == dict(name="model.layers.4.self_attn.q_proj", layer=4, module="self_attn.q_proj",
                           numel=4, removed=2, removed_fraction=0.5)
    assert rows[1]["layer"] == 5 and rows[1]["removed"] == 1
    # removed a: {q:(0,1),(1,0); d:2}; removed b: {q:(0,1),(1,1)} -> |∩| = 1, |∪| = 4
    assert mask_overlap(a, b) == pytest.approx(0.25)
    assert mask_overlap(a, a) == 1.0
    assert mask_overlap(a, {k: ~v for k, v in a.items()}) == 0.0
