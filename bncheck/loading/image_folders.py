"""Image folders (ROOT/CLASS/IMAGE) walked safely: symlinks followed, loops not."""
from __future__ import annotations

import heapq
import os
from pathlib import Path


def image_folder_without_loops(datasets):
    """torchvision's ImageFolder, except that symlinked folders are entered once each: its os.walk
    follows links without noticing loops, which counts the same images again (or never ends)."""

    class ImageFolderWithoutLoops(datasets.ImageFolder):
        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            from torchvision.datasets.folder import has_file_allowed_extension

            def valid(name: str) -> bool:
                return is_valid_file(name) if is_valid_file is not None else \
                    has_file_allowed_extension(name, extensions)

            samples, empty = [], []
            for name in sorted(class_to_idx):
                # A link back to the top or into another class would count other classes' images here.
                others = [Path(directory)] + [Path(directory) / other for other in class_to_idx if other != name]
                files = [f for f in _files_entering_each_folder_once(Path(directory) / name, others) if valid(f)]
                samples += [(f, class_to_idx[name]) for f in files]
                if not files:
                    empty.append(name)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
            return samples

    return ImageFolderWithoutLoops


def _files_entering_each_folder_once(root: Path, excluded: list[Path]) -> list[str]:
    """Every file under ``root``, following symlinks, each real folder (device, inode) visited once and
    the ``excluded`` folders never; in the order of torchvision's sorted walk: folders by path, files by
    name within."""
    seen = {(info.st_dev, info.st_ino) for info in map(_stat_or_none, excluded) if info is not None}
    pending, found = [str(root)], []
    while pending:
        folder = heapq.heappop(pending)
        try:
            info = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:  # a dangling link or a loop the OS refuses to resolve
            continue
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:
                continue
            if is_folder:
                heapq.heappush(pending, entry.path)
            elif entry.is_file():
                found.append(entry.path)
    return found


def _stat_or_none(path: Path):
    try:
        return os.stat(path)
    except OSError:
        return None
