"""The MFT wrapper: a frozen linear projection whose weight is multiplied by a mask learned through scores.

Forward: ``y = x (W ⊙ m)^T + b`` with ``m = top-k(|scores|)`` (exact count; per matrix, or across the masked
matrices in mode ``global-abs-exact``). Backward (straight-through, as the official code): the mask's gradient
``dL/dm = dL/dW_eff ⊙ W`` is passed unchanged to ``|scores|``, so ``dL/dscores = sign(scores) ⊙ W ⊙ dL/dW_eff``.
Mode ``global-signed-threshold`` is the official ``SupermaskLinearThreshold``: ``m = scores >= threshold`` on the
signed scores, whose gradient is then ``dL/dm`` itself (no ``|.|`` in between, so no sign). The weight never
receives a gradient (frozen, bit-identical).

The mask depends only on the scores, which only change at ``optimizer.step()``: it is cached under a key made of
the scores' version counter, identity and storage, so micro-batches of one accumulation step and the recomputed
forward of non-reentrant gradient checkpointing reuse it. Fused optimizers (``AdamW(fused=True)``, the Trainer's
``adamw_torch_fused``) update in place WITHOUT bumping the version counter, so the key also holds a per-score step
count that a process-wide optimizer step post-hook increments for every score an optimizer stepped.
``selections`` counts recomputations (tests, benchmarks). Writes through ``scores.data`` or by optimizers that are
not ``torch.optim.Optimizer`` subclasses over the scores themselves (DeepSpeed ZeRO's flat partitions) bypass both;
call ``invalidate_masks`` after those.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from mft_bench.errors import MftBenchError
from mft_bench.masking.architectures import is_transposed, resolve_targets
from mft_bench.masking.selection import (
    CutHint,
    global_keep_masks,
    keep_mask_of_abs,
    module_generator,
    removed_count,
    signed_threshold_for_ratio,
    signed_threshold_keep,
)
from mft_bench.recipe import GLOBAL_ABS_EXACT, GLOBAL_SIGNED_THRESHOLD, LOCAL, MaskSpec

logger = logging.getLogger(__name__)

SCORE_INIT_STD = 0.02
_STEP_ATTR = "_mft_optimizer_steps"  # set on each scores Parameter; its presence marks it as MFT scores
_step_hook = None  # the one process-wide optimizer hook (torch has no per-parameter "was stepped" event)


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            steps = getattr(param, _STEP_ATTR, None)
            if steps is not None:
                setattr(param, _STEP_ATTR, steps + 1)


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _masked_weight(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight * mask).to(dtype)


def _project(x: torch.Tensor, w_eff: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, w_eff, bias)
    # GPT-2 Conv1D: weight is (in, out); same arithmetic as Conv1D.forward so exported logits match exactly.
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, x2, w_eff) if bias is not None else x2 @ w_eff
    return out.view(*x.shape[:-1], w_eff.shape[1])


class MaskedLinearFunction(torch.autograd.Function):
    """Linear projection with the effective weight ``W ⊙ mask`` and the straight-through score gradient (through
    ``|scores|``, or to the signed scores themselves when the mask thresholds them: ``signed``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scores, mask, transposed: bool, signed: bool = False):  # noqa: D401
        w_eff = _masked_weight(weight, mask, weight.dtype)
        out = _project(x, w_eff, bias, transposed)
        ctx.transposed = transposed
        ctx.signed = signed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, scores, mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scores, mask = ctx.saved_tensors
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        dtype = grad_out.dtype  # the dtype the forward ran in (autocast included)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = grad_s = None
        if need_x:
            w_eff = _masked_weight(weight, mask, dtype)
            grad_x = (g2 @ (w_eff.t() if ctx.transposed else w_eff)).view(x.shape).to(x.dtype)
        if need_w or need_s:
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            grad_w_eff = x2.t() @ g2 if ctx.transposed else g2.t() @ x2  # shaped like the stored weight
            if need_w:  # only if someone unfroze the weight; before grad_s, which may reuse grad_w_eff in place
                grad_w = (grad_w_eff * mask).to(weight.dtype)
            if need_s:
                grad_s = grad_w_eff.to(scores.dtype).mul_(weight)
                if not ctx.signed:
                    grad_s.mul_(torch.sign(scores))
        if need_b:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None, None


class _GlobalSelector:
    """Shared by the wrappers of one ``global-abs-exact`` attach: one exact-count cut across all their scores."""

    def __init__(self, members: list[MaskedLinear], mask_ratio: float) -> None:
        self.members = members
        self._index = {id(m): i for i, m in enumerate(members)}
        self.mask_ratio = mask_ratio
        self._key: tuple | None = None
        self._masks: list[torch.Tensor] = []
        self._cut_hint = CutHint()

    def mask_of(self, member: MaskedLinear) -> torch.Tensor:
        key = tuple(m._cache_key() for m in self.members)
        if key != self._key:
            with torch.no_grad():
                self._masks = global_keep_masks(
                    [m.scores.detach().abs() for m in self.members], self.mask_ratio, self._cut_hint
                )
            self._key = key
            for m in self.members:
                m.selections += 1
        return self._masks[self._index[id(member)]]

    def invalidate(self) -> None:
        self._key = None


class MaskedLinear(nn.Module):
    """Wraps an ``nn.Linear`` or ``Conv1D`` in place; owns ``weight`` (same frozen Parameter), ``bias`` and the
    trainable fp32 ``scores``, so state-dict keys are the original ones plus ``<name>.scores``."""

    def __init__(self, module: nn.Module, scores: torch.Tensor, *, name: str, mask_ratio: float) -> None:
        super().__init__()
        # Not registered as a submodule: keeps the state dict flat and lets apply_masks put it back.
        self.__dict__["base_module"] = module
        self.weight = module.weight
        self.bias = module.bias
        self.scores = nn.Parameter(scores.to(device=module.weight.device, dtype=torch.float32))
        self.transposed = is_transposed(module)
        self.name = name
        self.mask_ratio = mask_ratio
        self.n_remove = removed_count(self.weight.numel(), mask_ratio)
        self.selections = 0
        self._group: _GlobalSelector | None = None
        self.threshold: float | None = None  # set in mode global-signed-threshold: mask = scores >= threshold
        self._key: tuple | None = None
        self._mask: torch.Tensor | None = None
        self._cut_hint = CutHint()  # speeds up the next selection; never changes its result

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def _cache_key(self) -> tuple:
        s = self.scores
        if not hasattr(s, _STEP_ATTR):  # new Parameter object (deepcopy, module.to with swapping): re-mark it
            setattr(s, _STEP_ATTR, 0)
        return (id(s), s._version, getattr(s, _STEP_ATTR), s.data_ptr(), s.device, s.dtype)

    def current_mask(self) -> torch.Tensor:
        """The bool keep-mask (shaped like ``weight``) of the current scores; recomputed only when they changed.
        Treat it as read-only: it is shared with the autograd graph."""
        if self._group is not None:
            return self._group.mask_of(self)
        key = self._cache_key()
        if key != self._key:
            with torch.no_grad():
                if self.threshold is not None:
                    self._mask = signed_threshold_keep(self.scores, self.threshold)
                else:
                    self._mask = keep_mask_of_abs(self.scores, self.n_remove, self._cut_hint)
            self._key = key
            self.selections += 1
        return self._mask

    def invalidate(self) -> None:
        self._key = None
        if self._group is not None:
            self._group.invalidate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MaskedLinearFunction.apply(x, self.weight, self.bias, self.scores, self.current_mask(), self.transposed,
                                          self.threshold is not None)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.transposed else "Linear"
        return (f"{kind}(in={self.in_features}, out={self.out_features}, bias={self.bias is not None}), "
                f"mask_ratio={self.mask_ratio}, mode={self.mode}")

    @property
    def mode(self) -> str:
        if self.threshold is not None:
            return GLOBAL_SIGNED_THRESHOLD
        return GLOBAL_ABS_EXACT if self._group is not None else LOCAL


def init_scores(weight: torch.Tensor, init: str, seed: int, name: str) -> torch.Tensor:
    """Initial fp32 scores: ``normal`` N(0, 0.02) from a (seed, name) generator on CPU, or ``magnitude`` |W|."""
    if init == "magnitude":
        return weight.detach().abs().to(torch.float32).clone()
    if init == "normal":
        return torch.normal(0.0, SCORE_INIT_STD, tuple(weight.shape), generator=module_generator(seed, name))
    raise MftBenchError(f"mask.init must be one of normal, magnitude, got {init!r}")


def wrappers(model: nn.Module) -> dict[str, MaskedLinear]:
    """The model's MaskedLinear wrappers by module name, in module order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, MaskedLinear)}


def attach_masks(model: nn.Module, spec: MaskSpec, *, seed: int = 0) -> list[str]:
    """Wrap the modules ``spec`` selects in place; freeze every parameter; only the scores train. ``seed`` (the
    recipe's) draws the ``normal`` initial scores, one generator per module name.

    Returns the wrapped module names (``model.layers.2.self_attn.q_proj``).
    """
    if wrappers(model):
        raise MftBenchError("mask: this model already has masks attached; attach once per model")
    targets = resolve_targets(model, spec.layers, spec.modules)
    _ensure_step_hook()
    for param in model.parameters():
        param.requires_grad_(False)
    attached: list[MaskedLinear] = []
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, attr)
        scores = init_scores(module.weight, spec.init, seed, name)
        wrapper = MaskedLinear(module, scores, name=name, mask_ratio=spec.mask_ratio)
        setattr(parent, attr, wrapper)
        attached.append(wrapper)
    if spec.mode == GLOBAL_ABS_EXACT:
        group = _GlobalSelector(attached, spec.mask_ratio)
        for wrapper in attached:
            wrapper._group = group
    elif spec.mode == GLOBAL_SIGNED_THRESHOLD:
        threshold = spec.threshold
        if threshold is None:  # from the initial scores, so a resumed run (attached afresh) gets the same one
            threshold = signed_threshold_for_ratio([w.scores for w in attached], spec.mask_ratio)
        for wrapper in attached:
            wrapper.threshold = threshold
        logger.info("global-signed-threshold: entries with a score below %.6g are removed", threshold)
    n_scores = sum(w.scores.numel() for w in attached)
    logger.info("attached masks to %d modules (%d scores, mask_ratio %.3g, %s, init %s)",
                len(attached), n_scores, spec.mask_ratio, spec.mode, spec.init)
    return targets


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: bool mask shaped like that module's weight}`` (True = kept) for the current scores (copies)."""
    found = wrappers(model)
    if not found:
        raise MftBenchError("mask: the model has no masks attached (call attach_masks first)")
    return {name: w.current_mask().clone() for name, w in found.items()}


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable scores, one per wrapped module (what the optimizer gets)."""
    return [w.scores for w in wrappers(model).values()]


def masked_module_names(model: nn.Module) -> list[str]:
    return list(wrappers(model))


def refresh_masks(model: nn.Module) -> int:
    """Bring every mask up to date with its scores now (e.g. right after ``optimizer.step()``); returns how many
    selections ran. The forward does the same lazily; this only moves the work to a chosen moment."""
    found = wrappers(model).values()
    before = sum(w.selections for w in found)
    for w in found:
        w.current_mask()
    return sum(w.selections for w in found) - before


def invalidate_masks(model: nn.Module) -> None:
    """Force recomputation at the next use (needed only after writing scores through ``.data``)."""
    for w in wrappers(model).values():
        w.invalidate()
