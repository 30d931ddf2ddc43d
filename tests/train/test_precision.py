"""Training precision: the paper recipes' bf16 settings keep fp32 master weights, so small updates are not lost.

A step of AdamW at lr 2e-5 moves a weight by ~2e-5, below half a bf16 ulp for |w| ~ 0.02: training the bf16 weights
themselves ("pure") drops most updates, the mixed setting (fp32 weights, bf16 autocast compute) keeps them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from train_helpers import fast_arm, losses, tiny_dataset, tiny_setup

from mft_bench.recipe import LoraSpec
from mft_bench.train import train_fft, train_lora
from mft_bench.train.lora import merged_dense

PAPER_LR = 2e-5


class _KeepTrainedWeights(TrainerCallback):
    """The weights as the optimizer left them (before any export cast)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {name: p.detach().float().clone() for name, p in model.named_parameters()}


def _train_three_steps(tmp_path, name: str, *, dtype: torch.dtype, compute: str, precision: str):
    model, tokenizer = tiny_setup()
    model.to(dtype)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    keep = _KeepTrainedWeights()
    spec, run = fast_arm(max_steps=3, learning_rate=PAPER_LR, global_batch_size=4, compute_dtype=compute,
                         precision=precision)
    result = train_fft(model, tokenizer, tiny_dataset(12), None, spec, run, tmp_path / name, callbacks=[keep])
    changed = {n: keep.weights[n] != start[n] for n in start}
    return changed, losses(result.log_history), keep.weights, result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run as (share of the updatable weights it changed, losses, trained weights, result). Updatable: the
    entries an fp32 run changes (embedding rows of bytes absent from the data get no gradient in any precision)."""
    tmp = tmp_path_factory.mktemp("precision")
    raw = {
        "fp32": _train_three_steps(tmp, "fp32", dtype=torch.bfloat16, compute="float32", precision="mixed"),
        "mixed": _train_three_steps(tmp, "mixed", dtype=torch.bfloat16, compute="bfloat16", precision="mixed"),
        "pure": _train_three_steps(tmp, "pure", dtype=torch.bfloat16, compute="bfloat16", precision="pure"),
    }
    updatable = raw["fp32"][0]
    total = sum(int(m.sum()) for m in updatable.values())
    assert total > 0.8 * sum(m.numel() for m in updatable.values())
    share = {key: sum(int((changed[n] & updatable[n]).sum()) for n in updatable) / total
             for key, (changed, *_) in raw.items()}
    return {key: (share[key], *rest) for key, (_, *rest) in raw.items()}


def test_mixed_precision_keeps_almost_every_update(runs):
    changed, _, weights, _ = runs["mixed"]
    assert changed >= 0.95
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_pure_bf16_loses_most_updates(runs):
    """The defect the mixed setting guards against, shown on the same data and steps."""
    assert runs["pure"][0] < 0.5 < runs["mixed"][0]


def test_mixed_precision_ends_within_one_percent_of_fp32(runs):
    (_, fp32_losses, _, _), (_, mixed_losses, _, _) = runs["fp32"], runs["mixed"]
    assert [s for s, _ in fp32_losses] == [s for s, _ in mixed_losses] == [1, 2, 3]
    assert abs(mixed_losses[-1][1] - fp32_losses[-1][1]) <= 0.01 * fp32_losses[-1][1]


def test_exports_and_result_are_in_the_backbones_dtype(runs):
    _, _, weights, result = runs["mixed"]
    from safetensors.torch import load_file

    step, folder = result.checkpoints[-1]
    saved = load_file(folder / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(saved[name], weights[name].to(torch.bfloat16))  # the fp32 master, rounded once


def test_lora_merge_runs_in_fp32_then_casts_once(tmp_path):
    """Merging into bf16 weights would round W + delta through a bf16 delta; the merge is done in fp32."""
    model, tokenizer = tiny_setup()
    model.to(torch.bfloat16)
    spec, run = fast_arm(LoraSpec, max_steps=2, learning_rate=1e-3, global_batch_size=4, compute_dtype="bfloat16",
                         r=4, alpha=8)
    captured = {}

    class _KeepPeftModel(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            captured["peft"] = copy.deepcopy(model)

    result = train_lora(model, tokenizer, tiny_dataset(8), None, spec, run, tmp_path,
                        callbacks=[_KeepPeftModel()])
    peft_model = captured["peft"]
    adapter = next(p for n, p in peft_model.named_parameters() if "lora_A" in n)
    assert adapter.dtype == torch.float32  # mixed precision: adapters train in fp32 over a bf16 base
    name = "model.layers.0.self_attn.q_proj.weight"
    base = dict(peft_model.named_parameters())[f"base_model.model.{name.replace('.weight', '.base_layer.weight')}"]
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default").float()
    expected = (base.float() + delta).to(torch.bfloat16)
    assert torch.equal(dict(result.model.named_parameters())[name], expected)
    assert torch.equal(dict(merged_dense(peft_model, torch.bfloat16).named_parameters())[name], expected)
