"""Writing output files safely: never over an input, never over an existing file unless forced,
never half-written.

Every command that writes a file goes through :class:`OutputTarget`: :func:`check_output` before
the work (so a bad ``-o`` fails at once) and :func:`write_output` at the end, which checks again,
writes a temporary file beside the target and moves it into place. Without ``force`` the last step
is an exclusive create (a hard link that fails when the name exists), so a file that appeared while
bncheck ran is never replaced. A run killed before it could clean up leaves a temporary file named
``.bncheck-HOST-PID-TOKEN.tmp...``; the next write into that folder removes those whose process is gone.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BncheckError, InputError, OutputExistsError, OutputIsInputError, summarize

# .bncheck-HOST-PID-TOKEN.tmp[.suffix]: HOST (a hash of the host name) and PID tell whose it is, so that
# a sweep removes only files of processes that are gone from this machine (not another container's).
_TEMP_NAME = re.compile(r"^\.bncheck-([0-9a-f]{6})-(\d+)-[0-9a-f]{8}\.tmp")
_KNOWN_COMPOUND_SUFFIXES = (".weights.h5",)  # Keras picks the format by this whole ending
_LONGEST_KEPT_SUFFIX = 32


@dataclass(frozen=True)
class OutputTarget:
    """A file the user asked bncheck to write.

    ``path`` is the name as typed (its suffix picks the format, even when it is a symlink to a
    differently named file); ``inputs`` are ``(option, path)`` pairs of every file or folder the
    command reads, which the output may never be, by any name; ``force`` allows replacing an
    existing file that is not an input.
    """

    path: Path
    inputs: tuple[tuple[str, Path], ...] = ()
    force: bool = False
    option: str = "-o"


def check_output(target: OutputTarget) -> None:
    """Raise :class:`InputError` when ``target`` cannot be written; touches nothing."""
    path = target.path
    _check_name_length(target, path)
    real = Path(os.path.realpath(path))
    _check_name_length(target, real)
    if real.is_dir():
        raise InputError(f"{target.option} {path} is a folder; pass a file name")
    _refuse_inputs(target, real)
    if not real.parent.is_dir():
        folder = real.parent if path.is_symlink() else path.parent
        raise InputError(f"output folder does not exist: {folder}; create it or choose another {target.option}")
    if real.is_file() and not target.force:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it, or choose another {target.option}")


def write_output(target: OutputTarget, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside the target, then move it into place.

    The temporary name ends with the typed name's suffix, for writers that pick a format by it.
    A symlink is written through, never replaced. Failures of ``write`` (a full disk, a read-only
    folder) become :class:`InputError`; a failure or an interrupt leaves no file behind.
    """
    check_output(target)
    real = Path(os.path.realpath(target.path))
    if real.exists() and not real.is_file():
        # /dev/stdout, a FIFO, a device: write in place, there is nothing to swap in atomically.
        _writing(target, lambda: write(str(real)))
        return
    sweep_stale_temp_files(real.parent)
    temp = _create_temp(target, real.parent)
    try:
        _writing(target, lambda: write(str(temp)))
        os.chmod(temp, _mode_for(real, target.force))
        _writing(target, lambda: _move_into_place(temp, real, target))
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """The library's writer: ``path`` is the caller's own choice, so an existing file is replaced."""
    write_output(OutputTarget(Path(path), force=True, option="path"), write)


def write_bytes_atomically(path: Path, payload: bytes) -> None:
    write_atomically(path, lambda temp: Path(temp).write_bytes(payload))


def sweep_stale_temp_files(folder: Path) -> list[Path]:
    """Remove temporary files of bncheck runs that were killed (their process no longer exists)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or match.group(1) != _host_tag() or _process_alive(int(match.group(2))):
            continue
        stale = folder / name
        try:
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
                removed.append(stale)
        except OSError:
            pass  # another run swept it first, or the folder is read-only: nothing lost
    return removed


def temp_prefix(pid: int) -> str:
    """How the temporary files of process ``pid`` on this machine start."""
    return f".bncheck-{_host_tag()}-{pid}-"


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _refuse_inputs(target: OutputTarget, real: Path) -> None:
    output = _identity(real)
    for option, given in target.inputs:
        source = _identity(Path(given))
        # by name too: another output of the same command need not exist yet
        same_name = Path(os.path.realpath(given)) == real
        if source is None and not same_name:
            continue
        if same_name or (output is not None and output == source):
            alias = "" if Path(given) == target.path else f" {given} by another name"
            raise OutputIsInputError(
                f"{target.option} {target.path} is the {option} file{alias}: bncheck never writes over its "
                f"inputs; choose another {target.option}")
        if Path(given).is_dir() and _inside(real, source):
            raise OutputIsInputError(
                f"{target.option} {target.path} is inside the {option} folder {given}: bncheck never writes "
                f"into its inputs; choose another {target.option}")


def _check_name_length(target: OutputTarget, path: Path) -> None:
    name_max = _name_max(path.parent)
    if len(path.name.encode()) > name_max:
        raise InputError(f"{target.option} {target.path}: the file name is longer than the {name_max} bytes this "
                         "file system allows; choose a shorter name")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) after following symlinks: equal for the same file under any name or hard link."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _inside(path: Path, folder: tuple[int, int]) -> bool:
    return any(_identity(parent) == folder for parent in path.parents)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_suffix(typed: Path) -> str:
    """The typed name's format suffix, so that the writer sees the format the user asked for."""
    name = typed.name
    for known in _KNOWN_COMPOUND_SUFFIXES:
        if name.lower().endswith(known):
            return name[-len(known):]
    suffix = typed.suffix
    return suffix if len(suffix) <= _LONGEST_KEPT_SUFFIX else ""


def _create_temp(target: OutputTarget, folder: Path) -> Path:
    for _ in range(16):
        temp = folder / f"{temp_prefix(os.getpid())}{secrets.token_hex(4)}.tmp{_temp_suffix(target.path)}"
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return temp
        except FileExistsError:
            continue
        except OSError as error:
            raise _write_error(target, error) from error
    raise InputError(f"cannot create a temporary file in {folder}; clear out .bncheck-* files there")


def _mode_for(real: Path, force: bool) -> int:
    """An overwritten file keeps its permissions; a new one gets what open() would give it."""
    if force:
        try:
            return stat.S_IMODE(os.stat(real).st_mode)
        except FileNotFoundError:
            pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _move_into_place(temp: Path, real: Path, target: OutputTarget) -> None:
    if target.force:
        os.replace(temp, real)
        return
    try:
        os.link(temp, real)  # fails if the name exists, even if it appeared a moment ago
    except FileExistsError:
        raise OutputExistsError(f"{target.path} appeared while bncheck ran and was left as it is; pass --force "
                                f"to overwrite it, or choose another {target.option}") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        _reserve_then_replace(temp, real, target)  # a file system without hard links


def _reserve_then_replace(temp: Path, real: Path, target: OutputTarget) -> None:
    try:
        os.close(os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise OutputExistsError(f"{target.path} appeared while bncheck ran and was left as it is; pass --force "
                                f"to overwrite it, or choose another {target.option}") from None
    os.replace(temp, real)


def _writing(target: OutputTarget, action: Callable[[], None]) -> None:
    try:
        action()
    except BncheckError:
        raise
    except Exception as error:  # OSError, torch's "[enforce fail ...] file write failed", SafetensorError
        raise _write_error(target, error) from error


def _write_error(target: OutputTarget, error: Exception) -> InputError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else summarize(error, 160)
    return InputError(f"cannot write {target.path}: {reason}; check the free disk space and the folder's "
                      f"permissions, or choose another {target.option}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we can ask about: leave its file
    return True
