"""Writing output files atomically: a reader never sees a half-written file, and a
failure leaves nothing behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, then move it into place.

    The temporary name keeps ``path``'s suffixes, for writers that pick a format by suffix.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    suffix = "".join(path.suffixes)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the mode open() would
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, payload: bytes) -> None:
    write_atomically(path, lambda temp: Path(temp).write_bytes(payload))
