"""Doing a :mod:`dcprop.specs.damage` spec to a checkpoint on disk (rank side).

One rank calls :func:`damage` on a completed checkpoint directory, while the others
wait: the checkpoint is then what a full disk, a lost shard, bit rot or a stale
file would have left.  A flip in a tensor's data is placed through DCP's metadata:
each stored tensor's ``storage_data`` range holds a ``torch.save`` archive, whose one
data record (stored, never compressed) is the tensor's bytes, so the flip lands in
values, never in a header or the archive's alignment padding.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zipfile

from dcprop import specs as S
from dcprop.errors import DcpropError

__all__ = ["METADATA", "damage", "data_files", "tensor_ranges"]

#: the metadata file of a DCP checkpoint (``FileSystemWriter`` writes it last)
METADATA = ".metadata"

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


def data_files(path: str) -> list[str]:
    """The checkpoint's data files: every regular file under ``path`` but the metadata
    (and DCP's temporary files), sorted by path relative to ``path``."""
    found = []
    for parent, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), path)
            if rel != METADATA and not rel.endswith(".tmp"):
                found.append(rel)
    return sorted(found)


def _pick(path: str, index: int) -> str:
    files = data_files(path)
    if not files:
        raise DcpropError(f"the checkpoint at {path} holds no data file to damage")
    return os.path.join(path, files[index % len(files)])


def _metadata(path: str) -> str:
    """DCP's metadata file; in a layout without one (a checkpointer of its own), the
    first data file, so that the damage still lands somewhere the load reads."""
    found = os.path.join(path, METADATA)
    return found if os.path.isfile(found) else _pick(path, 0)


def tensor_ranges(path: str) -> list[tuple[str, int, int]]:
    """``(file, offset, length)`` of each stored tensor's own bytes with at least one
    byte, in the order of DCP's ``storage_data`` keys (fqn, then chunk offset)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(path).read_metadata()
    items = [
        (index, info)
        for index, info in metadata.storage_data.items()
        if isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
    ]
    items.sort(key=lambda item: (item[0].fqn, tuple(item[0].offset or ())))
    out = []
    for _, info in items:
        file = os.path.join(path, info.relative_path)
        with open(file, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        start, length = _archive_data(blob, file)
        if length:
            out.append((file, info.offset + start, length))
    return out


def _archive_data(blob: bytes, file: str) -> tuple[int, int]:
    """Offset and length, within ``blob`` (one ``torch.save`` archive), of its tensor
    data record."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED:
        raise DcpropError(f"{file}: a stored tensor is not one uncompressed torch.save record")
    record = records[0]
    _, name, extra = _LOCAL_HEADER.unpack_from(blob, record.header_offset)
    return record.header_offset + _LOCAL_HEADER.size + name + extra, record.file_size


def _flip(file: str, offset: int, mask: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def _flip_tensor(spec: S.FlipTensorByte, path: str) -> str:
    if not os.path.isfile(os.path.join(path, METADATA)):
        file = _pick(path, spec.entry)
        offset = int(spec.at * os.path.getsize(file))
    else:
        ranges = tensor_ranges(path)
        if not ranges:
            raise DcpropError(f"the checkpoint at {path} stores no tensor bytes to flip")
        file, start, length = ranges[spec.entry % len(ranges)]
        offset = start + int(spec.at * length)
    _flip(file, offset, spec.mask)
    return f"flipped byte {offset} of {os.path.relpath(file, path)} with {spec.mask:#04x}"


def damage(spec: S.FileDamage, path: str, older: str | None = None) -> str:
    """Do ``spec`` to the checkpoint at ``path`` (``older``: an earlier checkpoint of
    the same job, for :class:`~dcprop.specs.StaleFile`); returns what was done."""
    if isinstance(spec, S.RemoveFile):
        file = _pick(path, spec.index)
        os.remove(file)
        return f"removed {os.path.relpath(file, path)}"
    if isinstance(spec, S.Truncate):
        file = _metadata(path) if spec.target == "metadata" else _pick(path, spec.index)
        size = int(spec.keep * os.path.getsize(file))
        os.truncate(file, size)
        return f"truncated {os.path.relpath(file, path)} to {size} bytes"
    if isinstance(spec, S.FlipTensorByte):
        return _flip_tensor(spec, path)
    if isinstance(spec, S.FlipMetadataByte):
        file = _metadata(path)
        offset = int(spec.at * os.path.getsize(file))
        _flip(file, offset, spec.mask)
        return f"flipped byte {offset} of {os.path.relpath(file, path)} with {spec.mask:#04x}"
    if isinstance(spec, S.StaleFile):
        if older is None:
            raise DcpropError("StaleFile damage needs the older checkpoint")
        file = _pick(path, spec.index)
        rel = os.path.relpath(file, path)
        stale = os.path.join(older, rel)
        if not os.path.isfile(stale):
            stale = _pick(older, spec.index)
        shutil.copyfile(stale, file)
        return f"copied {os.path.relpath(stale, os.path.dirname(older))} over {rel}"
    raise DcpropError(f"{spec!r} is not damage to a checkpoint's files")
