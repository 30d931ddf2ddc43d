"""The two global mask modes, named apart: ``global-abs-exact`` (mft-bench's exact count over |scores|) and
``global-signed-threshold`` (the official code's ``SupermaskLinearThreshold``), compared with the official rule
re-implemented from its source; the refusal of the ambiguous ``global``; mask baselines in a global mode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from mft_bench.backbone import tiny_model
from mft_bench.errors import MftBenchError
from mft_bench.masking import attach_masks, baseline_masks, current_masks, removed_counts
from mft_bench.masking.masked_linear import wrappers
from mft_bench.masking.selection import official_percentile, signed_threshold_for_ratio
from mft_bench.recipe import MaskSpec, load_recipe
from mft_bench.stages import build_plan

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
SIGNED = "global-signed-threshold"


# ---------------------------------------------------------------- the official rule, re-implemented from its source
# transformers/src/transformers/models/llama/modeling_llama.py and scripts/finetune.py of Ming-K9/MFT at b36f2da.

class _OfficialGetSubnetThreshold(autograd.Function):
    @staticmethod
    def forward(ctx, scores, threshold):
        return torch.where(scores < threshold, torch.zeros_like(scores), torch.ones_like(scores))

    @staticmethod
    def backward(ctx, g):
        return g, None


def _official_threshold_forward(x, weight, bias, scores, threshold):
    """``SupermaskLinearThreshold.forward``."""
    subnet = _OfficialGetSubnetThreshold.apply(scores, threshold)
    return F.linear(x, weight * subnet, bias)


def _official_percentile(t, q):
    k = 1 + round(float(q) * (t.numel() - 1))
    return t.view(-1).kthvalue(k).values.item()


# ---------------------------------------------------------------- helpers

def _model(seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    return tiny_model("llama", vocab_size=VOCAB, num_layers=3, seed=seed).to(device)


def _mixed_sign_scores(model: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Scores of both signs with different spreads per matrix (so a signed cut and an |.| cut differ), some exactly
    at 0.0 and at -0.01 (ties with the thresholds used below)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, wrapper) in enumerate(wrappers(model).items()):
        scores = torch.randn(wrapper.scores.shape, generator=generator) * 0.02 * (1 + i) + 0.005 * (i % 3 - 1)
        flat = scores.view(-1)
        flat[::17] = 0.0
        flat[5::23] = -0.01
        out[name] = scores
    return out


def _set_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, wrapper in wrappers(model).items():
            wrapper.scores.copy_(scores[name].to(wrapper.scores.device))


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB - 3, (2, 12), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- global-signed-threshold = the official rule

@pytest.mark.parametrize("threshold", [-0.01, 0.0, 0.013])
def test_signed_threshold_masks_equal_the_official_rule(threshold, device):
    model = _model(device=device)
    attach_masks(model, MaskSpec(layers=[0, 2], mode=SIGNED, threshold=threshold))
    scores = _mixed_sign_scores(model)
    _set_scores(model, scores)
    ours = {name: mask.cpu() for name, mask in current_masks(model).items()}
    for name, mask in ours.items():
        official = _OfficialGetSubnetThreshold.apply(scores[name].to(device), threshold).cpu()
        assert torch.equal(mask, official.bool()), name
    # the ties: an entry exactly at the threshold is kept, as `scores < threshold` leaves it
    tied = torch.cat([(scores[n] == threshold)[ours[n]] for n in ours])
    if threshold in (-0.01, 0.0):
        assert int(tied.sum()) > 0


def test_signed_threshold_gradients_equal_the_official_ones():
    """The straight-through gradient goes to the signed scores unchanged (no sign(scores) factor), so the scores'
    gradients equal the official module's on the same weights, scores and batch."""
    threshold = -0.005
    model = _model()
    attach_masks(model, MaskSpec(layers=[1], mode=SIGNED, threshold=threshold))
    scores = _mixed_sign_scores(model, seed=3)
    _set_scores(model, scores)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    ours = {name: w.scores.grad.clone() for name, w in wrappers(model).items()}

    official = _model()
    official_scores = {}
    for name in ours:
        parent_name, _, attr = name.rpartition(".")
        parent = official.get_submodule(parent_name)
        linear = getattr(parent, attr)
        linear.weight.requires_grad_(False)
        param = nn.Parameter(scores[name].clone())
        official_scores[name] = param

        class _Threshold(nn.Module):
            def __init__(self, inner: nn.Linear, s: nn.Parameter) -> None:
                super().__init__()
                self.inner, self.scores = inner, s

            def forward(self, x):
                return _official_threshold_forward(x, self.inner.weight, self.inner.bias, self.scores, threshold)

        setattr(parent, attr, _Threshold(linear, param))
    official(input_ids=ids, labels=ids).loss.backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, official_scores[name].grad, rtol=1e-5, atol=1e-9)
    # through |scores| (local and global-abs-exact) the same step would carry sign(scores): here it must not
    negative = torch.cat([(scores[n] < 0).view(-1) for n in ours])
    grads = torch.cat([ours[n].view(-1) for n in ours])
    official_grads = torch.cat([official_scores[n].grad.view(-1) for n in ours])
    assert bool(negative.any()) and torch.equal(torch.sign(grads[negative]), torch.sign(official_grads[negative]))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_threshold_from_ratio_is_the_official_percentile_of_all_initial_scores(ratio, device):
    model = _model(device=device)
    attach_masks(model, MaskSpec(layers=[0, 1], mask_ratio=ratio, mode=SIGNED))
    found = wrappers(model)
    flat = torch.cat([w.scores.detach().reshape(-1) for w in found.values()]).cpu()
    expected = _official_percentile(flat, ratio)
    assert {w.threshold for w in found.values()} == {expected}
    assert signed_threshold_for_ratio([w.scores for w in found.values()], ratio) == expected
    assert official_percentile(flat, ratio) == expected
    removed = sum(int((~m).sum()) for m in current_masks(model).values())
    assert removed == int((flat < expected).sum())  # the entries strictly below the k-th smallest: about ratio
    assert abs(removed / flat.numel() - ratio) < 1e-3


def test_the_two_global_modes_differ_on_mixed_sign_scores():
    """Same scores, same ratio: |score| exact count removes the entries nearest zero, the signed threshold the most
    negative ones; the removed counts also differ per matrix and in total."""
    ratio = 0.2
    masks = {}
    for mode in ("global-abs-exact", SIGNED):
        model = _model()
        attach_masks(model, MaskSpec(layers=[0, 1], mask_ratio=ratio, mode=mode))
        scores = _mixed_sign_scores(model, seed=5)
        _set_scores(model, scores)
        if mode == SIGNED:  # the threshold the ratio gives on these scores, so both aim at the same fraction
            threshold = _official_percentile(torch.cat([s.view(-1) for s in scores.values()]), ratio)
            for wrapper in wrappers(model).values():
                wrapper.threshold = threshold
                wrapper.invalidate()
        masks[mode] = current_masks(model)
    exact, signed = masks["global-abs-exact"], masks[SIGNED]
    assert any(not torch.equal(exact[n], signed[n]) for n in exact)
    all_scores = torch.cat([s.view(-1) for s in scores.values()])
    total = all_scores.numel()
    assert sum(int((~m).sum()) for m in exact.values()) == round(ratio * total)
    removed_signed = torch.cat([(~signed[n]).view(-1) for n in signed])
    removed_exact = torch.cat([(~exact[n]).view(-1) for n in exact])
    assert float(all_scores[removed_signed].max()) < 0  # only negative scores fall below the signed threshold
    assert float(all_scores[removed_exact].abs().max()) < float(all_scores[removed_signed].abs().min())


def test_signed_threshold_count_follows_training_where_abs_exact_stays_exact():
    """Training moves the scores: under the constant signed threshold the removed count moves with them, while
    global-abs-exact removes round(ratio x total) at every step."""
    ratio, counts = 0.1, {}
    for mode in ("global-abs-exact", SIGNED):
        torch.manual_seed(0)
        model = _model()
        attach_masks(model, MaskSpec(layers=[0, 1], mask_ratio=ratio, mode=mode))
        optimizer = torch.optim.AdamW([w.scores for w in wrappers(model).values()], lr=0.05, weight_decay=0.0)
        counts[mode] = []
        for step in range(4):
            ids = _ids(step)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            counts[mode].append(sum(int((~m).sum()) for m in current_masks(model).values()))
        total = sum(w.scores.numel() for w in wrappers(model).values())
    assert counts["global-abs-exact"] == [round(ratio * total)] * 4
    assert len(set(counts[SIGNED])) > 1 and counts[SIGNED][-1] != round(ratio * total)


# ---------------------------------------------------------------- the old name is refused in one line

def test_plain_global_is_refused_naming_both_modes(tmp_path):
    with pytest.raises(ValueError) as info:
        MaskSpec(layers=[1], mode="global")
    assert "global-abs-exact" in str(info.value) and "global-signed-threshold" in str(info.value)
    recipe = tmp_path / "r.yaml"
    smoke = (ROOT / "tasks" / "smoke.yaml").read_text()
    recipe.write_text(smoke.replace("mask_ratio: 0.1", "mask_ratio: 0.1\n  mode: global"))
    with pytest.raises(MftBenchError) as info:
        load_recipe(recipe)
    line = str(info.value)
    assert "\n" not in line and "mask.mode: 'global' is ambiguous" in line
    assert "global-abs-exact" in line and "global-signed-threshold" in line


def test_threshold_needs_its_mode():
    with pytest.raises(ValueError, match="threshold applies to mode global-signed-threshold only"):
        MaskSpec(layers=[1], mode="local", threshold=0.0)
    with pytest.raises(MftBenchError, match="threshold applies to mode global-signed-threshold only"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["mask.threshold=0.0"])
    recipe = load_recipe(ROOT / "tasks" / "smoke.yaml", [f"mask.mode={SIGNED}", "mask.threshold=-0.02"])
    assert recipe.mask.threshold == -0.02


# ---------------------------------------------------------------- mask baselines in a global mode

def test_baselines_take_mft_counts_in_a_global_mode_only(tmp_path):
    local = {s.name: s for s in build_plan(load_recipe(ROOT / "tasks" / "smoke.yaml"), tmp_path)}
    assert "mft" not in local["random_mask"].deps and "removed_counts" not in local["random_mask"].key
    for mode in ("global-abs-exact", SIGNED):
        plan = {s.name: s for s in build_plan(load_recipe(ROOT / "tasks" / "smoke.yaml", [f"mask.mode={mode}"]),
                                              tmp_path)}
        for arm in ("random_mask", "magnitude_mask"):
            assert "mft" in plan[arm].deps and plan[arm].key["removed_counts"] == "mft"
    with pytest.raises(MftBenchError, match="add 'mft' to arms"):
        load_recipe(ROOT / "tasks" / "smoke.yaml", ["mask.mode=global-abs-exact", "arms=[fft,random_mask]"])


@pytest.mark.parametrize("mode", ["global-abs-exact", SIGNED])
def test_baselines_remove_the_counts_a_global_selection_produced(mode):
    model = _model()
    spec = MaskSpec(layers=[0, 1], mask_ratio=0.2, mode=mode)
    attach_masks(model, spec)
    _set_scores(model, _mixed_sign_scores(model, seed=7))
    mft = current_masks(model)
    counts = removed_counts(mft)
    assert len(set(c / mft[n].numel() for n, c in counts.items())) > 1  # not the local count everywhere
    for kind in ("random", "magnitude"):
        assert removed_counts(baseline_masks(model, spec, kind=kind, removed_counts=counts)) == counts
