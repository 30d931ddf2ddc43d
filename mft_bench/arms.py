"""The arms a recipe can compare: one entry per arm says what it needs, how it is made and how it is evaluated.

Everything else reads this table: the recipe's validation (``recipe.py``), the stage graph (``stages.py``), the
stage runners (``stage_runners.py``), the cost model (``plan_cost.py``), the training strategy
(``train.strategy``) and the reports' labels. Adding an arm is one entry here plus, for a new way of training,
its trainer in ``stage_runners.TRAINERS``.

How an arm is made (``stage``):

- ``None``: nothing is made; the arm is the backbone as loaded (``pretrained``).
- ``train``: a training stage trains ``trainer`` (``fft`` / ``mft`` / ``lora``) with the settings
  ``Recipe.train_spec(arm)`` gives, starting from ``starts_from`` (the backbone, or the FFT checkpoint that
  ``mask.start_from`` chooses).
- ``mask``: a mask stage applies the mask baseline ``mask_kind`` (``masking.baselines``) to that FFT checkpoint.

The word "baseline" means those mask baselines only; the untouched backbone is the ``pretrained`` arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StageKind = Literal["train", "mask"]
Start = Literal["backbone", "fft"]


@dataclass(frozen=True)
class Arm:
    """One arm of a recipe.

    ``label``: how the paper table and the figures name it. ``stage``: the kind of stage that makes its model
    (None: the backbone is the model). ``trainer``: the training method of a ``train`` stage, also what the cost
    model prices it as. ``settings``: the recipe section it trains with (``fft`` / ``mft`` / ``lora``);
    ``length_from``: the section whose training length (``recipe.LENGTH_FIELDS``) replaces that one's.
    ``mask_kind``: the mask baseline of a ``mask`` stage. ``starts_from``: the model it starts from. ``key``: the
    parts of the recipe its stage's content address covers (``stages.stage_key``). ``shardable``: it may train
    with FSDP (whole weights are never needed on one process); ``replicated``: every process needs the whole model
    (masks, merged adapters), so FSDP is refused. ``in_paper``: a column of the paper's table.
    ``matches_mft_counts``: in a global mask mode it removes, per matrix, the counts MFT's mask removed (so it
    needs MFT)."""

    name: str
    label: str
    stage: StageKind | None = None
    trainer: Literal["fft", "mft", "lora"] | None = None
    settings: Literal["fft", "mft", "lora"] | None = None
    length_from: Literal["fft", "mft", "lora"] | None = None
    mask_kind: str | None = None
    starts_from: Start = "backbone"
    key: tuple[str, ...] = ()
    shardable: bool = False
    replicated: bool = False
    in_paper: bool = True
    matches_mft_counts: bool = False

    @property
    def needs_fft(self) -> bool:
        """Whether the arm starts from the FFT model (so a recipe with it needs the ``fft`` arm)."""
        return self.starts_from == "fft"

    @property
    def trained(self) -> bool:
        return self.stage == "train"

    @property
    def has_stage(self) -> bool:
        """Whether a stage of its own makes its model (its evaluations depend on it)."""
        return self.stage is not None


# in plan order: an arm's stage comes after the stages of the arms it starts from
REGISTRY: tuple[Arm, ...] = (
    Arm("pretrained", "Pretrained"),
    Arm("fft", "FFT", stage="train", trainer="fft", settings="fft", key=("train", "backbone", "seed"), shardable=True),
    Arm("mft", "MFT", stage="train", trainer="mft", settings="mft", starts_from="fft", key=("train", "mask", "seed"),
        replicated=True),
    # the compute-matched control of MFT: FFT's update for MFT's length, from the FFT checkpoint MFT starts from
    Arm("fft_continued", "FFT continued", stage="train", trainer="fft", settings="fft", length_from="mft",
        starts_from="fft", key=("train", "start_from", "seed"), shardable=True, in_paper=False),
    Arm("lora", "LoRA", stage="train", trainer="lora", settings="lora", key=("train", "backbone", "seed"),
        replicated=True),
    Arm("random_mask", "Random mask", stage="mask", mask_kind="random", starts_from="fft",
        key=("mask", "kind", "seed"), matches_mft_counts=True),
    Arm("magnitude_mask", "Magnitude mask", stage="mask", mask_kind="magnitude", starts_from="fft",
        key=("mask", "kind", "seed"), matches_mft_counts=True),
    # the paper's structured "L1 mask": whole rows, so its count per matrix is its own in every mode
    Arm("l1_mask", "L1 mask (rows)", stage="mask", mask_kind="l1_rows", starts_from="fft",
        key=("mask", "kind", "seed")),
)
ARMS: dict[str, Arm] = {arm.name: arm for arm in REGISTRY}
ARM_NAMES: tuple[str, ...] = tuple(ARMS)
# arm names of earlier versions: the one line that says what replaced them
RENAMED_ARMS = {"baseline": "pretrained"}


def arm(name: str) -> Arm:
    """The registry entry of arm ``name`` (``KeyError`` names the known arms)."""
    try:
        return ARMS[name]
    except KeyError:
        raise KeyError(f"unknown arm {name!r}; arms are {', '.join(ARM_NAMES)}") from None


def renamed_arm_message(name: str) -> str | None:
    """The one line for an arm name an earlier version used, else None."""
    new = RENAMED_ARMS.get(name)
    if new is None:
        return None
    return f"arm '{name}' is now called '{new}' (the untouched backbone; 'baseline' means the mask baselines): " \
           f"write {new} in arms"


def trained_arms() -> tuple[str, ...]:
    return tuple(a.name for a in REGISTRY if a.trained)


def shardable_arms() -> tuple[str, ...]:
    return tuple(a.name for a in REGISTRY if a.shardable)


def replicated_arms() -> tuple[str, ...]:
    return tuple(a.name for a in REGISTRY if a.replicated)


def paper_arms() -> tuple[str, ...]:
    """The paper table's arms in its column order: the registry's, the method (MFT) last."""
    ordered = [a for a in REGISTRY if a.in_paper and a.trainer != "mft"] + [a for a in REGISTRY if a.trainer == "mft"]
    return tuple(a.name for a in ordered)


def arm_labels() -> dict[str, str]:
    return {a.name: a.label for a in REGISTRY}
