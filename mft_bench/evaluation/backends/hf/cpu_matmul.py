"""Faster few-row matmuls for CPU decoding: linear weights packed by MKL for the decode steps' row counts.

A decode step multiplies each weight by a handful of rows, where a weight packed by MKL for that row count
(``torch.ops.mkl._mkl_linear``) is faster than the plain product. The packed copies live beside the weights
(``PackedWeights``, kept across calls and packed again only when a weight changes); the weights themselves are
never touched, and the model's modules are restored when generation stops (``cpu_decode_matmuls``).
Timings by row count: ``benchmarks/README.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

PACKED_ROWS = (8, 16)  # packed sizes below the batch size (which is packed too), for the last rows of a call
MIN_PACKED_ROWS = 4  # fewer rows: their plain product is cheaper than a padded packed one
MAX_PACKED_BYTES = 2 << 30  # packed copies live beside the weights as long as the backend


class PackedWeights:
    """MKL-packed copies of linear weights by module, each valid while its weight is the same tensor with the
    same storage and version counter (an in-place change bumps the version; a replaced ``.data`` moves the
    storage), so a later ``generate`` call reuses them and a changed weight is packed again."""

    def __init__(self) -> None:
        self._entries: dict[torch.nn.Module, tuple[tuple[Any, ...], dict[int, torch.Tensor]]] = {}

    def get(self, linear: torch.nn.Linear, sizes: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Packed copies of ``linear.weight`` for each row count in ``sizes`` (``{}`` for none)."""
        if not sizes:
            self._entries.pop(linear, None)
            return {}
        weight = linear.weight
        key = (id(weight), weight.data_ptr(), weight._version, sizes)
        entry = self._entries.get(linear)
        if entry is None or entry[0] != key:
            entry = (key, {rows: _pack(weight.detach(), rows) for rows in sizes})
            self._entries[linear] = entry
        return entry[1]

    def keep_only(self, linears: list[torch.nn.Linear]) -> None:
        """Forget the copies of modules not in ``linears`` (no longer float32 linears, say)."""
        wanted = set(linears)
        for module in [m for m in self._entries if m not in wanted]:
            del self._entries[module]


@contextlib.contextmanager
def cpu_decode_matmuls(model: Any, device: torch.device, batch_rows: int, store: PackedWeights) -> Iterator[None]:
    """On CPU (``device``: where ``model`` is), make the few-row matmuls of decoding faster for the duration,
    restoring the model on exit.

    Each float32 ``nn.Linear`` (the output projection included) gets copies of its weight packed by MKL for
    products of 8, 16 and ``batch_rows`` rows, taken from ``store`` when it holds them for the weight as it is
    now; a decode step is padded with zero rows to the smallest packed size that holds it (``_packed_product``).
    Fewer rows, and prefill, take the plain product on the weights as they are: for 1-3 rows the fastest layout,
    for prefill's hundreds of rows as fast as a packed one. The output projection's plain product is
    ``(W @ x^T)^T``, faster at few rows."""
    if device.type != "cpu":
        store.keep_only([])  # a model moved off the CPU: its packed CPU copies are of no use
        yield
        return
    head = None
    with contextlib.suppress(AttributeError, NotImplementedError):
        head = model.get_output_embeddings()
    # (A module with its own instance ``forward``, e.g. an accelerate hook, is left alone.)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
               and m.weight.is_contiguous() and "forward" not in m.__dict__]
    sizes = tuple(sorted({rows for rows in PACKED_ROWS if rows < batch_rows} | {batch_rows}))
    if (batch_rows < MIN_PACKED_ROWS or not mkl_packing_available()
            or sum(m.weight.numel() for m in linears) * 4 * len(sizes) > MAX_PACKED_BYTES):
        sizes = ()
    store.keep_only(linears)
    for module in linears:
        packed = store.get(module, sizes)
        if module is head or packed:
            module.forward = _packed_forward(module, packed, _transposed_product if module is head else _plain_product)
    try:
        yield
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _packed_product(x: torch.Tensor, linear: torch.nn.Linear, packed: dict[int, torch.Tensor]):
    """``linear(x)`` through the smallest packed weight whose row count holds ``x``'s rows (padded with zero
    rows to it: a packing is for one row count), or None when none fits or ``x`` has too few rows. It runs for
    every linear of every decode step: few tensor operations, none for a full batch's rows."""
    n = x.numel() // x.shape[-1]
    size = min((size for size in packed if size >= n), default=None)
    if size is None or n < MIN_PACKED_ROWS:
        return None
    rows = x.reshape(n, x.shape[-1])
    if n < size:
        rows = torch.cat([rows, rows.new_zeros(size - n, rows.shape[1])])
    out = torch.ops.mkl._mkl_linear(rows.contiguous(), packed[size], linear.weight, linear.bias, size)
    return (out[:n] if n < size else out).view(*x.shape[:-1], out.shape[-1])


Product = Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]


def _packed_forward(
    linear: torch.nn.Linear, packed: dict[int, torch.Tensor], plain: Product,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear``'s forward during generation: through ``packed`` when ``_packed_product`` takes the rows, else
    ``plain(linear, x)``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = _packed_product(x, linear, packed)
        return out if out is not None else plain(linear, x)

    return forward


def _plain_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _transposed_product(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` as ``(W @ x^T)^T``: faster for the output projection at few rows."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(linear.weight, rows.t().contiguous()).t().contiguous()  # (argmax over strided rows is slower)
    if linear.bias is not None:
        out = out + linear.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])
