"""KV-cache storage for continuous batching: rows leave and join a running cache by copying only them.

The keys/values of each layer live in preallocated buffers (``BufferedLayer``), so a decode step writes one
column instead of re-copying the cache; a finished row's place is taken by a kept row from the end
(``compaction``); waiting rows are written into spare buffer rows, left-padded to the batch's width
(``admit``); columns no row attends to any more are dropped in place once they are a quarter of the rest
(``drop_dead_columns``). Rows are padded *after* the ``shared`` prefix columns (the same prompt prefix in every
row), so those stay the same columns in every row. Values never change, only where they are stored.

Only a plain ``DynamicCache`` (tensors per layer, ``mergeable``) is handled; the backend runs other caches in
fixed batches.
"""

from __future__ import annotations

from typing import Any

import torch

from mft_bench.evaluation.backends.hf.transformers_internals import DynamicLayer, is_layered_cache, make_layer


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views ``[:rows, :, :columns]`` of preallocated buffers with room
    to grow: a decode step writes one column in place instead of re-copying the whole cache (``torch.cat``)
    as ``DynamicLayer.update`` does, and rows admitted into a running batch are written into spare rows
    (``admit``). Values are the same; only the storage differs."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        rows, used, extra = self.keys.shape[0], self.keys.shape[-2], key_states.shape[-2]
        if used + extra > self.key_buffer.shape[-2]:
            _allocate(self, used + extra + max(extra, 64))
        self.key_buffer[:rows, :, used:used + extra] = key_states
        self.value_buffer[:rows, :, used:used + extra] = value_states
        self.keys = self.key_buffer[:rows, :, :used + extra]
        self.values = self.value_buffer[:rows, :, :used + extra]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New row ``j`` is old row ``indices[j]``, in place: only rows that change places are copied (with
        the order ``compaction`` gives, one per finished row); the rows after them become spare."""
        used, rows = self.keys.shape[-2], len(indices)
        moved = torch.nonzero(indices != torch.arange(rows, device=indices.device)).squeeze(1)
        if len(moved):
            for buffer in (self.key_buffer[:, :, :used], self.value_buffer[:, :, :used]):  # (not the spare)
                buffer.index_copy_(0, moved, buffer.index_select(0, indices[moved]))  # read all, then write
        self.keys, self.values = self.key_buffer[:rows, :, :used], self.value_buffer[:rows, :, :used]


def _allocate(layer: Any, capacity: int, rows: int = 0) -> None:
    """(Re)place ``layer``'s keys/values in buffers of ``capacity`` columns and at least ``rows`` rows (at least
    as many as it has now, spare ones included)."""
    used = layer.keys.shape[-2]
    rows = max(rows, layer.keys.shape[0], len(getattr(layer, "key_buffer", ())))
    shape = (rows, layer.keys.shape[1], capacity, layer.keys.shape[-1])
    count = layer.keys.shape[0]
    key_buffer, value_buffer = layer.keys.new_empty(shape), layer.values.new_empty(shape)
    key_buffer[:count, :, :used] = layer.keys
    value_buffer[:count, :, :used] = layer.values
    layer.key_buffer, layer.value_buffer = key_buffer, value_buffer
    layer.keys, layer.values = key_buffer[:count, :, :used], value_buffer[:count, :, :used]


def mergeable(cache: Any) -> bool:
    """Whether rows can be dropped from and added to ``cache``: a plain ``DynamicCache`` (tensors per layer)."""
    return is_layered_cache(cache, (DynamicLayer, BufferedLayer))


def buffer_layers(cache: Any, room: int, rows: int = 0) -> None:
    """Give every layer of ``cache`` preallocated room for ``room`` more columns and ``rows`` rows in all (see
    ``BufferedLayer``), unless it has that room already."""
    for layer in cache.layers:
        if (type(layer) is BufferedLayer and layer.key_buffer.shape[-2] >= layer.keys.shape[-2] + room
                and len(layer.key_buffer) >= rows):
            continue
        make_layer(layer, BufferedLayer)
        _allocate(layer, layer.keys.shape[-2] + room, rows)


def compaction(done: list[bool]) -> list[int]:
    """Batch positions of the rows not ``done``, in their new order: each finished row's place among the first
    ones is taken by a kept row from the end, so only those rows move (see ``BufferedLayer``)."""
    kept = len(done) - sum(done)
    order = list(range(kept))
    holes = (j for j in range(kept) if done[j])
    for hole, row in zip(holes, (j for j in range(kept, len(done)) if not done[j])):
        order[hole] = row
    return order


def admit(
    cache: Any, mask: torch.Tensor, new_cache: Any, new_mask: torch.Tensor, count: int, shared: int, rows: int,
) -> tuple[Any, torch.Tensor]:
    """Append the first ``count`` rows of ``new_cache`` to the buffered ``cache`` (which gets at least ``rows``
    rows of buffer), written into its spare buffer rows and padded after the ``shared`` prefix columns to its
    width, so a running batch takes new rows by copying only them. Rows wider than the cache first widen it
    (the one case that copies the cache)."""
    width = max(mask.shape[1], new_mask.shape[1])
    if width > mask.shape[1]:
        mask = pad_at(mask, width, shared)
        for layer in cache.layers:
            spare = max(layer.key_buffer.shape[-2] - layer.keys.shape[-2], 64)
            for name in ("key", "value"):
                merged = _stack_rows([getattr(layer, name + "s")], width, shared, spare, len(layer.key_buffer))
                setattr(layer, name + "_buffer", merged)
                setattr(layer, name + "s", merged[:len(mask), :, :width])
    buffer_layers(cache, 0, max(rows, len(mask) + count))
    used = len(mask)
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("key", "value"):
            buffer = getattr(layer, name + "_buffer")
            _place(buffer[used:used + count], getattr(new_layer, name + "s")[:count], width, shared)
            setattr(layer, name + "s", buffer[:used + count, :, :width])
    return cache, torch.cat([mask, pad_at(new_mask[:count], width, shared)])


def without_first_rows(cache: Any, count: int) -> Any:
    """``cache`` without its first ``count`` rows (views of the rest)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[count:], layer.values[count:]
    return cache


def drop_dead_columns(cache: Any, mask: torch.Tensor, shared: int) -> tuple[Any, torch.Tensor]:
    """``cache`` without the columns no row attends to (left behind by finished rows) once they are a quarter of
    the columns after the ``shared`` prefix, in place: the live columns after the prefix move left in their
    buffers (the prefix columns, attended by every row, stay where they are)."""
    live = torch.nonzero(mask.bool().any(0)).squeeze(1)
    dead = mask.shape[1] - len(live)
    if not dead or dead * 4 < mask.shape[1] - shared:
        return cache, mask
    own = live[shared:]  # (every row attends to the prefix columns: they are live[:shared])
    width = shared + len(own)
    for layer in cache.layers:
        for name in ("key", "value"):
            buffer = getattr(layer, name + "_buffer")
            buffer[:len(mask), :, shared:width] = getattr(layer, name + "s").index_select(-2, own)
            setattr(layer, name + "s", buffer[:len(mask), :, :width])
    return cache, mask[:, live]


def concat_rows(
    parts: list[tuple[Any, torch.Tensor]], shared: int = 0, room: int = 0, rows: int = 0,
) -> tuple[Any, torch.Tensor]:
    """One cache (the first part's object) holding the rows of all ``parts`` in order, each padded to the widest
    right after its ``shared`` prefix columns (so those stay the same columns in every row), without the columns
    no row attends to (so the cache does not keep growing as rows come and go). With ``room``, its layers are
    ``BufferedLayer``s with that many free columns (and at least ``rows`` rows). Each part is copied once, by
    slices, into its rows of the merged tensor (a second copy only when columns are dropped), not padded into
    copies that buffering would copy again."""
    width = max(part_mask.shape[1] for _, part_mask in parts)
    mask = torch.cat([pad_at(part_mask, width, shared) for _, part_mask in parts])
    attended = mask.any(0)
    columns = None if bool(attended.all()) else torch.nonzero(attended).squeeze(1)
    if columns is not None:
        mask = mask[:, columns]
    cache = parts[0][0]
    for index, layer in enumerate(cache.layers):
        for name in ("key", "value"):
            tensors = [getattr(part.layers[index], name + "s") for part, _ in parts]
            if columns is None:
                merged = _stack_rows(tensors, width, shared, room, rows if room else 0)
                if room:
                    setattr(layer, name + "_buffer", merged)
                setattr(layer, name + "s", merged[:len(mask), :, :width])
            else:
                setattr(layer, name + "s", _stack_rows(tensors, width, shared).index_select(-2, columns))
        if room:
            make_layer(layer, BufferedLayer)
            if columns is not None:
                _allocate(layer, layer.keys.shape[-2] + room, rows)
    return cache, mask


def _stack_rows(tensors: list[torch.Tensor], width: int, shared: int, room: int = 0, rows: int = 0) -> torch.Tensor:
    """The rows of ``tensors`` (batch, heads, columns, dim) in one tensor of ``width + room`` columns and at least
    ``rows`` rows, each padded with zeros right after its first ``shared`` columns to ``width`` (``_place``); the
    ``room`` columns and spare rows are left unwritten."""
    first = tensors[0]
    total = sum(len(t) for t in tensors)
    out = first.new_empty((max(total, rows), first.shape[1], width + room, first.shape[-1]))
    row = 0
    for t in tensors:
        _place(out[row:row + len(t)], t, width, shared)
        row += len(t)
    return out


def _place(target: torch.Tensor, t: torch.Tensor, width: int, shared: int) -> None:
    """Write ``t`` into ``target``'s first ``width`` columns, padded with zeros right after its first ``shared``
    columns (zeros: padded columns are masked, but a masked value must be finite)."""
    pad = width - t.shape[-2]
    target[:, :, :shared] = t[:, :, :shared]
    target[:, :, shared:shared + pad] = 0
    target[:, :, shared + pad:width] = t[:, :, shared:]


def pad_at(t: torch.Tensor, width: int, at: int, dim: int = -1) -> torch.Tensor:
    """``t`` widened to ``width`` along ``dim`` by zeros inserted before index ``at``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.narrow(dim, 0, at), t.new_zeros(shape), t.narrow(dim, at, t.shape[dim] - at)], dim=dim)
