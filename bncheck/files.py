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
    from .errors import InputError

    path = Path(os.path.realpath(path))  # write through a symlink, never replace it
    if path.exists() and not path.is_file():
        # /dev/stdout, a FIFO, a device: write in place, there is nothing to swap in atomically.
        _or_input_error(lambda: write(str(path)), path, InputError)
        return
    directory = path.parent
    suffix = "".join(path.suffixes)
    handle, temp = _or_input_error(
        lambda: tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=f".tmp{suffix}"), path, InputError)
    os.close(handle)
    try:
        write(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; give the mode open() would
        _or_input_error(lambda: os.replace(temp, path), path, InputError)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _or_input_error(action, path: Path, error_type):
    try:
        return action()
    except OSError as error:
        raise error_type(f"cannot write {path}: {error.strerror or error}; choose a writable file") from error


def write_bytes_atomically(path: Path, payload: bytes) -> None:
    write_atomically(path, lambda temp: Path(temp).write_bytes(payload))
