"""Mask files: bit-packed safetensors (1 bit per weight plus a small header) tied to the base weights by hash.

Layout: a single uint8 tensor ``masks`` holding every keep-mask (True = kept) flattened row-major over the
weight as stored, concatenated in ``index`` order and packed 8 entries per byte (little bit order); one tensor
keeps the header small enough for <= 1.01 bits per masked weight even on ~1M-weight bands. Header metadata
(strings): ``format``, ``format_version``, ``index`` (JSON list of ``[name, shape, removed]``), ``mask_ratio``,
``base_hash`` (sha256 over the masked modules' base weights), ``mft_bench_version``, plus caller extras.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mft_bench.errors import MftBenchError

logger = logging.getLogger(__name__)

FORMAT = "mft-bench-mask"
FORMAT_VERSION = "1"
TENSOR_KEY = "masks"
_HASH_CHUNK = 1 << 26  # bytes per hashlib update: bounded host memory for GPU-resident 7B bands


def pack_masks(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Bool masks -> one uint8 tensor: all entries concatenated, 8 per byte (little bit order)."""
    flat = torch.cat([m.detach().reshape(-1).to(device="cpu", dtype=torch.bool) for m in masks])
    return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))


def unpack_masks(packed: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    bits = np.unpackbits(packed.numpy(), count=sum(sizes), bitorder="little").astype(bool)
    return [part.view(shape) for part, shape in zip(torch.from_numpy(bits).split(sizes), shapes, strict=True)]


def base_weights_hash(model: nn.Module, names: Iterable[str]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each named module's weight, names sorted.

    Wrapped and plain models give the same hash (the wrapper holds the same weight); a model with masks already
    applied (zeros written) does not. Cost is one pass over the band's bytes (~1.6 GB for a LLaMA-2-7B 4-layer band).
    """
    digest = hashlib.sha256()
    for name in sorted(names):
        try:
            weight = model.get_submodule(name).weight
        except AttributeError as exc:
            raise MftBenchError(f"mask: module '{name}' not found in the base model") from exc
        w = weight.detach()
        digest.update(f"{name}|{w.dtype}|{tuple(w.shape)}|".encode())
        raw = w.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, raw.numel(), _HASH_CHUNK):
            digest.update(raw[start:start + _HASH_CHUNK].cpu().numpy().data)
    return digest.hexdigest()


def save_masks(
    masks: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    base_model: nn.Module | None = None,
    *,
    mask_ratio: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``masks`` bit-packed to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    ``mask_ratio`` defaults to the wrapped modules' ratio when ``base_model`` has masks attached, else to the
    realised removed fraction. Without ``base_model`` no base hash is stored and loading cannot verify the base.
    """
    if not masks:
        raise MftBenchError(f"mask file {path}: no masks to save")
    path = Path(path)
    removed = {name: int(m.numel() - int(m.sum())) for name, m in masks.items()}
    if mask_ratio is None:
        mask_ratio = _attached_ratio(base_model) if base_model is not None else None
    if mask_ratio is None:
        mask_ratio = sum(removed.values()) / sum(m.numel() for m in masks.values())
    if base_model is not None:
        for name, mask in masks.items():
            _check_shape(base_model, name, tuple(mask.shape), path)
    from mft_bench import __version__

    header = {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "index": json.dumps([[name, list(m.shape), removed[name]] for name, m in masks.items()], separators=(",", ":")),
        "mask_ratio": repr(float(mask_ratio)),
        "base_hash": base_weights_hash(base_model, masks) if base_model is not None else "",
        "mft_bench_version": __version__,
    }
    tensors = {TENSOR_KEY: pack_masks(masks.values())}
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        _sort_header(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("saved %d masks to %s (%.4f bits per masked weight)", len(masks), path, bits_per_weight(path))
    return path


def _sort_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, in place and at the same length.

    safetensors writes ``__metadata__`` from a hash map, in an order that changes between processes; sorting
    makes two runs of the same seed produce byte-identical mask files.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > size:  # cannot happen for a compact header; keep the file as written
            return
        handle.seek(8)
        handle.write(canonical + b" " * (size - len(canonical)))


def read_mask_metadata(path: str | os.PathLike) -> dict:
    """The mask file's header, decoded: modules (list), shapes (dict of tuples), removed (dict), mask_ratio
    (float), base_hash (str), numel (total masked weights), plus any other string fields as stored."""
    path = Path(path)
    if not path.is_file():
        raise MftBenchError(f"mask file {path} not found")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise MftBenchError(f"mask file {path} is not a readable safetensors file: {exc}") from exc
    if raw.get("format") != FORMAT:
        raise MftBenchError(f"mask file {path} is not an mft-bench mask file (format {raw.get('format')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise MftBenchError(
            f"mask file {path} has format version {raw.get('format_version')}, this mft-bench reads {FORMAT_VERSION}"
        )
    meta: dict = dict(raw)
    index = json.loads(meta.pop("index"))
    meta["modules"] = [name for name, _, _ in index]
    meta["shapes"] = {name: tuple(shape) for name, shape, _ in index}
    meta["removed"] = {name: int(count) for name, _, count in index}
    meta["mask_ratio"] = float(raw["mask_ratio"])
    meta["numel"] = int(sum(int(np.prod(s, dtype=np.int64)) for s in meta["shapes"].values()))
    return meta


def load_masks(path: str | os.PathLike, base_model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a mask file into ``{name: bool mask}`` (CPU). With ``base_model``, refuse a file made for other weights."""
    path = Path(path)
    meta = read_mask_metadata(path)
    if base_model is not None:
        for name in meta["modules"]:
            _check_shape(base_model, name, meta["shapes"][name], path)
        expected = meta["base_hash"]
        if not expected:
            logger.warning("mask file %s carries no base hash; cannot verify it belongs to this model", path)
        else:
            actual = base_weights_hash(base_model, meta["modules"])
            if actual != expected:
                raise MftBenchError(
                    f"mask file {path} was made for another base model (hash {actual[:16]} != {expected[:16]}); "
                    "load it onto the model it was trained on (the FFT checkpoint, before masks were applied)"
                )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        packed = f.get_tensor(TENSOR_KEY)
    parts = unpack_masks(packed, [meta["shapes"][name] for name in meta["modules"]])
    return dict(zip(meta["modules"], parts, strict=True))


def bits_per_weight(path: str | os.PathLike) -> float:
    """File size in bits divided by the number of masked weights it describes (header included)."""
    return Path(path).stat().st_size * 8 / read_mask_metadata(path)["numel"]


def _check_shape(model: nn.Module, name: str, shape: tuple, path: Path) -> None:
    try:
        weight = model.get_submodule(name).weight
    except AttributeError as exc:
        raise MftBenchError(f"mask file {path}: module '{name}' does not exist in the model") from exc
    if tuple(weight.shape) != tuple(shape):
        raise MftBenchError(
            f"mask file {path}: module '{name}' has weight shape {tuple(weight.shape)}, mask is {tuple(shape)}"
        )


def _attached_ratio(model: nn.Module) -> float | None:
    from mft_bench.masking.masked_linear import wrappers

    ratios = {w.mask_ratio for w in wrappers(model).values()}
    return ratios.pop() if len(ratios) == 1 else None
