"""Comparing state dicts so that a failure names what differs.

Every mismatch names the key, the rank, the shard (offset into the full tensor for
a DTensor), and the largest absolute difference.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from dcprop.errors import PropertyFailure

__all__ = [
    "Mismatch",
    "assert_same",
    "bits",
    "flatten",
    "full_values",
    "local_values",
    "mismatches",
    "same_bits",
]


class Mismatch:
    __slots__ = ("detail", "key")

    def __init__(self, key: str, detail: str) -> None:
        self.key, self.detail = key, detail

    def __str__(self) -> str:
        return f"{self.key}: {self.detail}"


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Nested dicts and lists as ``("model/fc.weight", value)`` pairs, keys sorted."""
    if isinstance(tree, Mapping):
        for k in sorted(tree, key=str):
            yield from flatten(tree[k], f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, x in enumerate(tree):
            yield from flatten(x, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def _is_dtensor(x: Any) -> bool:
    return hasattr(x, "to_local") and hasattr(x, "placements")


def _shard_where(x: Any) -> str:
    """Where this rank's shard of a DTensor sits in the full tensor."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
        return f"shard offset {tuple(offset)} shape {tuple(shape)} of {tuple(x.shape)}"
    except Exception:
        return f"local shard of {tuple(x.shape)}"


def local_values(tree: Any) -> dict[str, Any]:
    """Detached CPU copies of this rank's values (DTensors: their local shard, with
    their layout), for comparing later without keeping device memory alive."""
    out: dict[str, Any] = {}
    for key, x in flatten(tree):
        if _is_dtensor(x):
            out[key] = _LocalShard(x)
        elif isinstance(x, torch.Tensor):
            out[key] = x.detach().to("cpu", copy=True)
        else:
            out[key] = x
    return out


def full_values(tree: Any) -> dict[str, Any]:
    """Like :func:`local_values`, but DTensors gathered into full tensors (collective)."""
    out: dict[str, Any] = {}
    for key, x in flatten(tree):
        if _is_dtensor(x):
            out[key] = x.full_tensor().detach().to("cpu", copy=True)
        elif isinstance(x, torch.Tensor):
            out[key] = x.detach().to("cpu", copy=True)
        else:
            out[key] = x
    return out


class _LocalShard:
    """A DTensor's local shard plus where it lives, as plain CPU data."""

    __slots__ = ("mesh", "placements", "tensor", "where")

    def __init__(self, x: Any) -> None:
        self.tensor = x.to_local().detach().to("cpu", copy=True)
        self.placements = tuple(str(p) for p in x.placements)
        self.mesh = tuple(x.device_mesh.mesh.flatten().tolist())
        self.where = _shard_where(x)


# Same-width integer views: comparing these compares bit patterns, so NaN != 0.0,
# inf != the largest float, -0.0 != 0.0, and two NaNs are equal only with one payload.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit pattern as an integer tensor of the same element width (a complex
    tensor gets a last dim for its real and imaginary parts)."""
    t = _real(t)
    if not t.is_floating_point():
        return t  # integers and booleans compare bitwise already
    return t.contiguous().view(_BITS[t.element_size()])


def same_bits(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two runs' losses are the same floats bit for bit: a run that diverged to
    NaN equals its replay when the replay diverges the same way (``nan != nan`` would
    fail it), and -0.0 is not 0.0."""
    return len(a) == len(b) and struct.pack(f"{len(a)}d", *a) == struct.pack(f"{len(b)}d", *b)


def _tensor_detail(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> str | None:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} != {b.dtype}"
    if a.numel() == 0:
        return None
    if rtol == 0 and atol == 0:
        differ = bits(a) != bits(b)
        if a.is_complex():
            differ = differ.any(-1)
        what = "bitwise"
    else:
        # allclose, except that NaN equals only NaN (never a number)
        differ = ~torch.isclose(
            _real(a).double(), _real(b).double(), rtol=rtol, atol=atol, equal_nan=True
        )
        if a.is_complex():
            differ = differ.any(-1)
        what = f"beyond rtol={rtol:g}, atol={atol:g}"
    count = int(differ.sum())
    if not count:
        return None
    diff = (_real(a).double() - _real(b).double()).abs()
    if a.is_complex():
        diff = diff.amax(-1)
    # the largest difference among differing elements, NaN and inf included
    rank = torch.where(differ, diff.nan_to_num(nan=math.inf), -1.0)
    idx = int(rank.flatten().argmax())
    where = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.dim() else ()
    )
    expected, got = _show(a.flatten()[idx]), _show(b.flatten()[idx])
    if expected == got:  # NaNs with different payloads
        expected, got = (_show(x.flatten()[idx], bitwise=True) for x in (a, b))
    return (
        f"{count} of {a.numel()} elements differ {what}; largest difference "
        f"{diff.flatten()[idx].item():.6g} at index {where} (expected {expected}, got {got})"
    )


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _show(x: torch.Tensor, bitwise: bool = False) -> str:
    """One element, so that -0.0 and NaN read as such (``bitwise``: with its bits)."""
    if bitwise:
        return f"{x.item()!r} (bits {bits(x).flatten().tolist()})"
    value = x.item()
    return repr(value) if isinstance(value, (float, complex)) else str(value)


def mismatches(
    expected: Mapping[str, Any], actual: Mapping[str, Any], *, rtol: float = 0.0, atol: float = 0.0
) -> list[Mismatch]:
    """Every difference between two flattened dicts (bitwise unless rtol/atol given)."""
    out: list[Mismatch] = []
    for key in sorted(set(expected) - set(actual)):
        out.append(Mismatch(key, "missing after load"))
    for key in sorted(set(actual) - set(expected)):
        out.append(Mismatch(key, "present after load but not saved"))
    for key in sorted(set(expected) & set(actual)):
        a, b = expected[key], actual[key]
        if isinstance(a, _LocalShard) or isinstance(b, _LocalShard):
            if not (isinstance(a, _LocalShard) and isinstance(b, _LocalShard)):
                out.append(Mismatch(key, "DTensor on one side, plain tensor on the other"))
                continue
            if (a.mesh, a.placements) != (b.mesh, b.placements):
                out.append(
                    Mismatch(
                        key,
                        f"layout {a.placements} on ranks {a.mesh} != "
                        f"{b.placements} on ranks {b.mesh}",
                    )
                )
                continue
            detail = _tensor_detail(a.tensor, b.tensor, rtol, atol)
            if detail:
                out.append(Mismatch(key, f"{a.where}: {detail}"))
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            detail = _tensor_detail(a, b, rtol, atol)
            if detail:
                out.append(Mismatch(key, detail))
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            out.append(Mismatch(key, f"{type(a).__name__} != {type(b).__name__}"))
        elif a != b:
            out.append(Mismatch(key, f"{a!r} != {b!r}"))
    return out


def assert_same(
    expected: Mapping[str, Any],
    actual: Mapping[str, Any],
    *,
    what: str,
    rank: int,
    rtol: float = 0.0,
    atol: float = 0.0,
    limit: int = 8,
) -> None:
    """Raise :class:`PropertyFailure` listing the first ``limit`` mismatches."""
    found = mismatches(expected, actual, rtol=rtol, atol=atol)
    if found:
        tol = "bitwise" if rtol == atol == 0 else f"rtol={rtol:g}, atol={atol:g}"
        shown = "\n  ".join(str(m) for m in found[:limit])
        more = f"\n  ... and {len(found) - limit} more" if len(found) > limit else ""
        raise PropertyFailure(
            f"{what} on rank {rank}: differences in {len(found)} of "
            f"{len(set(expected) | set(actual))} entries ({tol}):\n  {shown}{more}",
            keys=[m.key for m in found],
        )
