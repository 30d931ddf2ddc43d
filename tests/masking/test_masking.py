"""Masking core: spec validation, module selection, exact counts, STE gradients, frozen weights, mask caching."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from torch import nn
from torch.func import functional_call

from mft_bench.backbone import TINY_ARCHS, tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.masking import (
    attach_masks,
    current_masks,
    keep_mask,
    mask_parameters,
    maskable_module_names,
    masked_module_names,
    refresh_masks,
    removed_count,
    selection,
)
from mft_bench.masking.masked_linear import wrappers
from mft_bench.recipe import MaskSpec, load_recipe

VOCAB = 64
SMOKE = Path(__file__).resolve().parents[2] / "tasks" / "smoke.yaml"


def _model(arch: str, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    model = tiny_model(arch, vocab_size=VOCAB, num_layers=3, seed=seed).to(device)
    for module in model.modules():  # deterministic forward in train mode (GPT-2 has dropout 0.1)
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _batch(seed: int = 0, batch: int = 2, length: int = 12, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB - 3, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------- spec and module selection

@pytest.mark.parametrize(
    "override",
    ["mask_ratio=1.5", "mask_ratio=0.0", "mask_ratio=1", "layers=[]", "layers=[1,1]", "init=uniform", "mode=row",
     "modules=[]"],
)
def test_spec_rejects_bad_values_in_one_line_naming_the_field(override):
    with pytest.raises(MftBenchError) as info:
        load_recipe(SMOKE, [f"mask.{override}"])
    line = str(info.value)
    assert "\n" not in line and f"mask.{override.split('=')[0]}: " in line


def test_spec_message_is_one_line_with_value():
    with pytest.raises(MftBenchError) as info:
        load_recipe(SMOKE, ["mask.mask_ratio=1.5"])
    assert str(info.value) == f"{SMOKE}: mask.mask_ratio: must be in (0, 1) (the REMOVED fraction), got 1.5"
    with pytest.raises(ValueError, match="mask_ratio"):  # the same schema, built in code
        MaskSpec(layers=[2], mask_ratio=1.5)


def test_layer_out_of_range_and_unknown_module_are_user_errors():
    model = _model("llama")
    with pytest.raises(MftBenchError, match=r"mask.layers: layer 40 out of range, model has 3 layers"):
        attach_masks(model, MaskSpec(layers=[40]))
    with pytest.raises(MftBenchError, match=r"no module 'foo_proj' in layer 2; available: q_proj, k_proj"):
        attach_masks(model, MaskSpec(layers=[2], modules=["foo_proj"]))
    with pytest.raises(MftBenchError, match="ambiguous"):
        attach_masks(_model("gpt2"), MaskSpec(layers=[0], modules=["c_proj"]))
    assert not masked_module_names(model)  # nothing half-attached


EXPECTED_DEFAULTS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
EXPECTED_DEFAULTS["qwen2"] = EXPECTED_DEFAULTS["mistral"] = EXPECTED_DEFAULTS["llama"]
PREFIX = {"gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attach_wraps_defaults_freezes_all_and_keeps_state_dict_keys(arch):
    model = _model(arch)
    keys_before = set(model.state_dict())
    names = attach_masks(model, MaskSpec(layers=[1, 2]))
    prefix = PREFIX.get(arch, "model.layers")
    assert names == [f"{prefix}.{i}.{m}" for i in (1, 2) for m in EXPECTED_DEFAULTS[arch]]
    assert masked_module_names(model) == names
    assert set(model.state_dict()) == keys_before | {f"{n}.scores" for n in names}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.scores" for n in names]
    assert all(p.dtype == torch.float32 for p in mask_parameters(model))
    assert set(maskable_module_names(model, 0)) >= set(EXPECTED_DEFAULTS[arch])
    with pytest.raises(MftBenchError, match="already has masks"):
        attach_masks(model, MaskSpec(layers=[0]))


def test_wrapper_keeps_the_same_weight_parameter_object():
    model = _model("qwen2")
    q = model.model.layers[1].self_attn.q_proj
    weight, bias = q.weight, q.bias
    attach_masks(model, MaskSpec(layers=[1], modules=["q_proj"]))
    wrapped = model.model.layers[1].self_attn.q_proj
    assert wrapped.weight is weight and wrapped.bias is bias and bias is not None


# ---------------------------------------------------------------- exact counts

@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_local_mode_removes_exactly_round_ratio_numel(arch, ratio, device):
    model = _model(arch, device=device)
    attach_masks(model, MaskSpec(layers=[0, 2], mask_ratio=ratio))
    masks = current_masks(model)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        assert int((~mask).sum()) == round(ratio * weight.numel())
        scores = model.get_submodule(name).scores.detach().abs()
        assert scores[~mask].max() <= scores[mask].min()  # the smallest |scores| are the removed ones


def test_keep_mask_is_exact_under_ties(device):
    for n_remove in (0, 1, 7, 50, 93, 100):
        flat = torch.zeros(100, device=device)
        flat[::3] = 1.0  # massive ties on both values
        mask = keep_mask(flat.view(10, 10), n_remove)
        assert int((~mask).sum()) == n_remove
        if 0 < n_remove <= 66:
            assert bool((flat.view(10, 10)[~mask] == 0).all())
    assert removed_count(10, 0.25) == round(2.5)


def _reference_removed(flat: torch.Tensor, n_remove: int) -> set[int]:
    return set(torch.sort(flat.cpu(), stable=True).indices[:n_remove].tolist())


@pytest.mark.parametrize("ratio", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_large_matrix_selection_equals_full_sort_when_untied(ratio, device):
    # Above BRACKET_MIN_NUMEL the cut is bracketed from a sample; the removed set must still be exactly the
    # n_remove smallest entries.
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(300, 700, generator=gen).abs().to(device)
    assert values.numel() >= selection.BRACKET_MIN_NUMEL
    n_remove = removed_count(values.numel(), ratio)
    mask = keep_mask(values, n_remove)
    removed = set(torch.nonzero(~mask.reshape(-1)).squeeze(1).tolist())
    assert removed == _reference_removed(values.reshape(-1), n_remove)


def test_large_matrix_selection_exact_when_sample_misleads_or_ties(device):
    n = 1 << 17
    n_remove = removed_count(n, 0.1)
    # The strided sample sees only large values: the sampled bracket misses and the unbounded one takes over.
    stride = (n // selection.SAMPLE_SIZE) | 1
    misleading = torch.zeros(n)
    misleading[::stride] = 10.0
    misleading += torch.linspace(0, 1e-3, n)
    # Massive ties across the cut: removed lowest index first, like a stable sort.
    tied = (torch.arange(n) % 7).float()
    for values in (misleading.to(device), tied.to(device)):
        mask = keep_mask(values.view(256, -1), n_remove)
        assert set(torch.nonzero(~mask.reshape(-1)).squeeze(1).tolist()) == _reference_removed(values, n_remove)


@pytest.mark.parametrize("values", ["normal", "tied"])
def test_cut_hint_changes_speed_never_the_result(values, device):
    # A resumed run starts without a hint: every bracket (hinted, sampled, unbounded) must select the same set.
    gen = torch.Generator().manual_seed(5)
    n = 300 * 700
    groups = ((torch.arange(n) % 5).float() - 2.0).to(device)
    scores = torch.randn(n, generator=gen).to(device) if values == "normal" else groups
    n_remove = removed_count(n, 0.1)
    hint, widths = selection.CutHint(), []
    for step, move in enumerate([0.0, 1e-4, 1e-4, 1e-3, 0.5, 1e-4, 1e-4, 1e-4]):  # 0.5: the cut jumps, a miss
        # "tied" moves whole groups of equal values together: the ties stay, at the cut too
        scores = scores + move * (torch.randn(n, generator=gen).to(device) if values == "normal" else groups)
        hinted = selection.keep_mask_of_abs(scores, n_remove, hint)
        assert torch.equal(hinted, keep_mask(scores.abs(), n_remove)), step
        assert set(torch.nonzero(~hinted).squeeze(1).tolist()) == _reference_removed(scores.abs(), n_remove)
        widths.append(hint.width)
    if values == "normal":
        assert hint.misses == 1  # the jump
        assert widths[3] < widths[0] and widths[-1] < widths[4] / 4  # narrows after small moves
    wrong = selection.CutHint(value=100.0, width=1e-4)  # far off: both hinted bounds above every value
    assert torch.equal(keep_mask(scores.abs(), n_remove, wrong), keep_mask(scores.abs(), n_remove))
    assert wrong.misses == 1


def test_hinted_selection_samples_a_bracket_only_after_a_miss(monkeypatch):
    sampled = []
    sample_bracket = selection._sample_bracket
    monkeypatch.setattr(selection, "_sample_bracket", lambda *args: sampled.append(1) or sample_bracket(*args))
    gen = torch.Generator().manual_seed(6)
    scores = torch.randn(300 * 700, generator=gen)
    n_remove = removed_count(scores.numel(), 0.1)
    hint = selection.CutHint()
    selection.keep_mask_of_abs(scores, n_remove, hint)
    assert len(sampled) == 1  # no hint yet
    lo, hi = hint.bracket()  # the first hint is far narrower than the sampled bracket (~4% of the entries)
    assert 0 < float(((scores.abs() >= lo) & (scores.abs() <= hi)).float().mean()) < 0.01
    for _ in range(3):
        scores = scores + 1e-4 * torch.randn(scores.numel(), generator=gen)
        selection.keep_mask_of_abs(scores, n_remove, hint)
    assert len(sampled) == 1 and hint.misses == 0
    selection.keep_mask_of_abs(scores * 3, n_remove, hint)  # the cut jumps: the hinted bracket misses
    assert len(sampled) == 2 and hint.misses == 1


def test_magnitudes_compared_by_bit_pattern_select_the_same_set(device):
    # keep_mask_of_abs compares float32 magnitudes as int32 bit patterns; zeros, subnormals, infinities, NaN and
    # brackets reaching below zero must give what float comparisons give.
    n = 1 << 17
    values = torch.randn(n, generator=torch.Generator().manual_seed(4))
    values[::5] = 0.0
    values[1::97] = -0.0
    values[2::89] = 1e-40  # subnormal
    values[3::1001] = float("-inf")
    values[4::997] = float("nan")  # kept by both paths, whatever the bracket
    values = values.to(device)
    for ratio in (0.1, 0.3, 0.5):
        n_remove = removed_count(n, ratio)
        expected = keep_mask(values.abs(), n_remove)
        for hint in (None, selection.CutHint(value=0.0, width=0.5), selection.CutHint(value=1e-40, width=3.0)):
            assert torch.equal(selection.keep_mask_of_abs(values, n_remove, hint), expected), (ratio, hint)


@pytest.mark.parametrize("n, density", [(1 << 16, 0.0005), (1 << 16, 0.3), ((1 << 16) + 3, 0.001), (64, 0.0)])
def test_true_indices_equal_nonzero(n, density, device):
    mask = (torch.rand(n, generator=torch.Generator().manual_seed(2)) < density).to(device)
    assert torch.equal(selection._true_indices(mask), torch.nonzero(mask).squeeze(1))


def test_global_mode_removes_total_count_by_one_threshold(device):
    model = _model("llama", device=device)
    attach_masks(model, MaskSpec(layers=[0, 1], mask_ratio=0.2, mode="global-abs-exact", init="magnitude"))
    masks = current_masks(model)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.2 * total)
    removed = torch.cat([model.get_submodule(n).scores.detach().abs()[~m] for n, m in masks.items()])
    kept = torch.cat([model.get_submodule(n).scores.detach().abs()[m] for n, m in masks.items()])
    assert removed.max() <= kept.min()
    fractions = {round(float((~m).float().mean()), 3) for m in masks.values()}
    assert len(fractions) > 1  # per-matrix counts differ: it really is one global threshold


def test_same_seed_same_masks_independent_of_global_rng():
    masks = []
    for global_seed, seed in ((1, 5), (2, 5), (3, 6)):
        torch.manual_seed(global_seed)
        model = _model("mistral")
        attach_masks(model, MaskSpec(layers=[1]), seed=seed)
        masks.append(current_masks(model))
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert not all(torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


def test_normal_init_statistics_and_magnitude_init():
    model = _model("llama")
    attach_masks(model, MaskSpec(layers=[0, 1, 2]))
    scores = torch.cat([p.detach().reshape(-1) for p in mask_parameters(model)])
    assert abs(scores.mean().item()) < 1e-3 and abs(scores.std().item() - 0.02) < 1e-3
    model = _model("gpt2")
    attach_masks(model, MaskSpec(layers=[1], init="magnitude"))
    for w in wrappers(model).values():
        assert torch.equal(w.scores.detach(), w.weight.detach().abs())


# ---------------------------------------------------------------- gradients

def _reference_grads(model_ref: nn.Module, masks: dict, scores: dict, ids: torch.Tensor):
    """Dense reference: W_eff = W * m with m a float leaf; dL/dscores = sign(s) * dL/dm."""
    m_float = {n: m.to(torch.float32).requires_grad_(True) for n, m in masks.items()}
    params = {f"{n}.weight": model_ref.get_submodule(n).weight.detach() * m_float[n] for n in masks}
    loss = functional_call(model_ref, params, kwargs=dict(input_ids=ids, labels=ids))
    loss = loss.loss
    loss.backward()
    return loss.detach(), {n: m_float[n].grad * torch.sign(scores[n]) for n in masks}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_score_gradient_matches_dense_reference(arch, device):
    model = _model(arch, device=device)
    reference = copy.deepcopy(model)
    attach_masks(model, MaskSpec(layers=[0, 2], mask_ratio=0.3))
    ids = _batch(device=device)
    loss = _loss(model, ids)
    loss.backward()
    masks = current_masks(model)
    scores = {n: w.scores.detach() for n, w in wrappers(model).items()}
    ref_loss, ref_grads = _reference_grads(reference, masks, scores, ids)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=1e-6)
    for name, w in wrappers(model).items():
        assert w.weight.grad is None
        assert w.scores.grad.abs().sum() > 0
        torch.testing.assert_close(w.scores.grad, ref_grads[name], rtol=1e-5, atol=1e-8)


def test_gradient_formula_directly_on_one_wrapper():
    # dL/ds = sign(s) * W * dL/dW_eff, with dL/dW_eff = g^T x for y = x W_eff^T
    model = _model("qwen2")
    attach_masks(model, MaskSpec(layers=[0], modules=["o_proj"], mask_ratio=0.5))
    w = wrappers(model)["model.layers.0.self_attn.o_proj"]
    w.weight.requires_grad_(True)  # not what MFT does, but then the weight gets the masked gradient
    x = torch.randn(3, 5, 32)
    g = torch.randn(3, 5, 32)
    (w(x) * g).sum().backward()
    grad_w_eff = g.reshape(-1, 32).t() @ x.reshape(-1, 32)
    expected = torch.sign(w.scores.detach()) * w.weight.detach() * grad_w_eff
    torch.testing.assert_close(w.scores.grad, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.weight.grad, grad_w_eff * w.current_mask(), rtol=1e-5, atol=1e-7)


def test_input_gradient_flows_through_masked_weight():
    model = _model("gpt2")
    attach_masks(model, MaskSpec(layers=[0], modules=["mlp.c_fc"]))
    w = wrappers(model)["transformer.h.0.mlp.c_fc"]
    x = torch.randn(4, 32, requires_grad=True)
    w(x).sum().backward()
    w_eff = w.weight.detach() * current_masks(model)["transformer.h.0.mlp.c_fc"]
    torch.testing.assert_close(x.grad, (torch.ones(4, 128) @ w_eff.t()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training behaviour

@pytest.mark.parametrize("arch, kind", [("llama", "for-loop"), ("llama", "fused"), ("gpt2", "foreach")])
def test_weights_stay_bit_identical_while_scores_train(arch, kind, device):
    model = _model(arch, device=device)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_masks(model, MaskSpec(layers=[1, 2]))
    first = current_masks(model)
    # fused AdamW does not bump the scores' version counter: the step hook must still refresh the masks
    options = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    optimizer = torch.optim.AdamW(mask_parameters(model), lr=0.05, weight_decay=0.0, **options)
    for step in range(3):
        _loss(model, _batch(step, device=device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if not name.endswith(".scores"):
            assert torch.equal(p.detach(), frozen[name]), name
    last = current_masks(model)
    assert any(not torch.equal(first[n], last[n]) for n in first)  # the scores did move the masks
    assert all(int((~m).sum()) == round(0.1 * m.numel()) for m in last.values())
    # first current_masks + one per changed scores (steps 2, 3 forwards, then the final current_masks)
    assert all(w.selections == 4 for w in wrappers(model).values())


def _train_steps(model, steps: int, micro: int, optimizer) -> dict:
    grads = {}
    device = next(model.parameters()).device
    for step in range(steps):
        for k in range(micro):
            (_loss(model, _batch(10 * step + k, device=device)) / micro).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
    return grads


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_selection_per_step_under_accumulation_and_checkpointing(arch, device):
    plain, ckpt = _model(arch, device=device), _model(arch, device=device)
    for model in (plain, ckpt):
        attach_masks(model, MaskSpec(layers=[0, 1, 2]))
        model.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    forwards = {"plain": 0, "ckpt": 0}
    grads = {}
    for label, model in (("plain", plain), ("ckpt", ckpt)):
        def count(*_, label=label):
            forwards[label] += 1
        for w in wrappers(model).values():
            w.register_forward_hook(count)
        optimizer = torch.optim.SGD(mask_parameters(model), lr=10.0)
        grads[label] = _train_steps(model, steps=2, micro=2, optimizer=optimizer)
        # 2 optimizer steps x 2 micro-batches: the mask of each step's scores is selected exactly once.
        assert {w.selections for w in wrappers(model).values()} == {2}, label
    n = len(wrappers(plain))
    assert forwards["plain"] == 4 * n
    assert forwards["ckpt"] > 6 * n  # checkpointing re-ran the forwards (non-reentrant may stop a recompute early)
    for name in grads["plain"]:
        torch.testing.assert_close(grads["ckpt"][name], grads["plain"][name], rtol=1e-5, atol=1e-8)
    assert refresh_masks(plain) == len(wrappers(plain))  # scores changed by the last step: one more each
    assert refresh_masks(plain) == 0


def test_mask_follows_scores_after_state_dict_reload(device):
    trained = _model("llama", device=device)
    attach_masks(trained, MaskSpec(layers=[1]))
    optimizer = torch.optim.AdamW(mask_parameters(trained), lr=0.05)
    _train_steps(trained, steps=2, micro=1, optimizer=optimizer)
    resumed = _model("llama", device=device)
    attach_masks(resumed, MaskSpec(layers=[1]))
    before = current_masks(resumed)
    resumed.load_state_dict(trained.state_dict())  # what a Trainer resume does
    after, target = current_masks(resumed), current_masks(trained)
    assert all(torch.equal(after[n], target[n]) for n in target)
    assert any(not torch.equal(before[n], target[n]) for n in target)
