"""The models stages read: CPU copies of the backbone and the FFT model, and the model an evaluation stage
evaluates, which is decided here once (``evaluated_model``): an object to load into this process, and the folder
(or hub id) another process or engine loads it from.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft_bench.arms import ARMS
from mft_bench.checkpoints import export_path, export_step
from mft_bench.recipe import Recipe
from mft_bench.stages import LAST, Stage

logger = logging.getLogger(__name__)


class ModelCache:
    """CPU copies of the backbone and of the FFT model, each loaded at most once per process; stages take copies
    of them where they change a model, and evaluation moves one to the device only while it runs."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self._backbone = None
        self._tokenizer = None
        self._fft = None

    def backbone(self):
        if self._backbone is None:
            from mft_bench.backbone import load_backbone

            spec = self.recipe.backbone
            logger.info("loading backbone %s", spec.name)
            self._backbone, self._tokenizer = load_backbone(spec.name, gguf_file=spec.gguf_file, dtype=spec.dtype,
                                                            seed=self.recipe.seed)
        return self._backbone

    def tokenizer(self):
        if self._tokenizer is None:
            self.backbone()
        return self._tokenizer

    def fft_model(self, fft_stage: Stage, step: int | None = None):
        """The FFT model at ``step`` (default: the end) as its stage saved it, so a resumed run and an
        uninterrupted one start MFT alike. One FFT checkpoint is kept loaded."""
        final = int(fft_stage.manifest()["outputs"]["export_steps"][-1])
        step = final if step is None else step
        if self._fft is None or self._fft[0] != step:
            self._fft = None
            folder = fft_stage.folder / "model" if step == final else export_path(fft_stage, step)
            self._fft = (step, load_model_folder(folder, self.recipe.backbone.dtype))
        return self._fft[1]


def load_model_folder(folder: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


@dataclass(frozen=True)
class EvaluatedModel:
    """The model an evaluation stage evaluates. ``load()`` gives the model object; ``cached``: that object is the
    cache's own (give it back to the CPU after). ``folder``: the folder it was loaded from (None: built in memory,
    or the backbone). ``by_name``: the backbone's name when another process loads it from the name alone."""

    load: Callable[[], Any]
    folder: Path | None = None
    cached: bool = False
    by_name: str | None = None


def evaluated_model(stage: Stage, stages: dict[str, Stage], models: ModelCache) -> EvaluatedModel:
    """What an evaluation stage evaluates: its arm's model at its checkpoint."""
    arm, dtype = ARMS[stage.arm], models.recipe.backbone.dtype
    if stage.checkpoint != LAST:
        trained = stages[stage.arm]
        path = export_path(trained, export_step(trained, stage.checkpoint))
        if arm.trainer == "mft":  # intermediate MFT checkpoints are mask files over the FFT model it started from
            return EvaluatedModel(lambda: _masked_fft(path, stage, stages, models))
        return EvaluatedModel(lambda: load_model_folder(path, dtype), folder=path)
    if not arm.has_stage:
        backbone = models.recipe.backbone
        return EvaluatedModel(models.backbone, cached=True,
                              by_name=backbone.name if _loadable_by_name(backbone) else None)
    folder = stages[stage.arm].folder / "model"
    if stage.arm == "fft":  # the model other arms start from: the cache holds it
        return EvaluatedModel(lambda: models.fft_model(stages["fft"]), folder=folder, cached=True)
    return EvaluatedModel(lambda: load_model_folder(folder, dtype), folder=folder)


def _masked_fft(masks: Path, stage: Stage, stages: dict[str, Stage], models: ModelCache):
    from mft_bench.masking import apply_masks, load_masks

    base = models.fft_model(stages["fft"], stages[stage.arm].manifest()["outputs"]["start"]["step"])
    return apply_masks(copy.deepcopy(base), load_masks(masks, base_model=base)).eval()


def saved_folder(model: EvaluatedModel, stage: Stage, models: ModelCache) -> Path:
    """A model folder (or hub id) an engine in another process can load: the arm's saved folder, the backbone's own
    folder or hub id, else a dense export written into the stage folder (GGUF, in-process tiny models,
    intermediate MFT masks)."""
    if model.folder is not None:
        return model.folder
    if model.by_name is not None:
        return Path(model.by_name)
    folder = stage.folder / "model"
    if not (folder / "config.json").is_file():
        save_model_atomic(model.load(), models.tokenizer(), folder)
    return folder


def _loadable_by_name(backbone) -> bool:
    """Whether another process loads the backbone from its name alone: a hub id or a plain HF folder (not the
    embedded GGUF, a ``gguf_file`` or an in-process ``tiny:`` model)."""
    from mft_bench.backbone import EMBEDDED_DEFAULT

    if backbone.gguf_file or backbone.name == EMBEDDED_DEFAULT or backbone.name.startswith("tiny:"):
        return False
    path = Path(backbone.name)
    return (path / "config.json").is_file() or not path.exists()


# ----------------------------------------------------------------------------- writing model folders


def fresh_tmp_dir(target: Path) -> Path:
    """A sibling temporary folder for ``target``, emptied of what a killed attempt may have left."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a completely written folder into place (the stage is unfinished, so an old copy is a leftover)."""
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def save_model_atomic(model, tokenizer, folder: Path) -> None:
    tmp = fresh_tmp_dir(folder)
    model.save_pretrained(tmp)  # safetensors (the only format in transformers 5)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, folder)


def materialize(source: Path, target: Path) -> None:
    """``target`` as a copy of the finished export folder ``source`` (hard links where the disk allows: a 7B model
    is not written twice)."""
    tmp = fresh_tmp_dir(target)
    tmp.mkdir(parents=True)
    for path in source.iterdir():
        try:
            os.link(path, tmp / path.name)
        except OSError:
            shutil.copy2(path, tmp / path.name)
    replace_dir(tmp, target)
