"""Checks of .npy and .npz files before numpy reads them."""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError, summarize


def check_numpy_file(path: Path) -> None:
    """Read the headers before the arrays: a damaged or hostile header must not make numpy allocate
    what it claims (10**12 items), nor may garbage reach numpy's pickle fallback."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as handle:
                _check_npy_header(handle, path.stat().st_size, f"data {path}")
            return
        if not zipfile.is_zipfile(path):
            raise DataError(f"data {path} is not a .npz archive; write it with numpy.savez(path, x=..., y=...)")
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        _check_npy_header(member, info.file_size, f"data {path}, array {info.filename[:-4]!r},")
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError) as exc:  # RuntimeError: encrypted
        raise DataError(f"data {path} is damaged ({summarize(exc)}); write it again with numpy.save/savez") from exc


def _check_npy_header(handle, size: int, what: str) -> None:
    try:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            return  # a newer header format: numpy reads it, and this check does not
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(handle)
    except (ValueError, TypeError, SyntaxError) as exc:
        raise DataError(f"{what} is not a numpy array file ({summarize(exc, 120)}); write it with numpy.save") \
            from exc
    if dtype.hasobject:
        raise DataError(f"{what} holds Python objects (dtype {dtype}), which bncheck does not unpickle; "
                        "save numeric arrays")
    claimed = math.prod(shape) * dtype.itemsize
    available = size - handle.tell()
    if claimed > available:
        raise DataError(f"{what} claims an array of shape {tuple(shape)} ({claimed} bytes) but holds "
                        f"{max(available, 0)}: the file is truncated or damaged")
