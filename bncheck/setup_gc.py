"""Python's cyclic garbage collector kept off the objects a command's setup leaves behind.

Importing torch and torchvision leaves about a million Python objects that live until the process
exits, and every full collection walks all of them: 0.5-0.9 s of a ``bncheck`` run went there
(measured with ``gc.callbacks``). During a command the collector is paused while torch is imported;
what exists then is frozen (``gc.freeze``) and the collector runs again while the user's code
builds the model and the data, so garbage made there (a training loop in ``build_model``) is
still collected. What is alive once loading ends is frozen too, so the collections during the
passes see only what the passes allocate. Leaving the command undoes all of it, except when the
process ends with the command (``bncheck`` itself, ``python -m bncheck``): unfrozen, the objects
would be walked again by the interpreter's collections at shutdown (about 0.6 s on resnet18).
Where the caller has frozen objects of its own, or a command runs inside another, nothing is
touched.
"""
from __future__ import annotations

import contextlib
import gc


class SetupGC:
    def __init__(self):
        self._active = False
        self._was_enabled = True
        self.process_ends_after = False   # set by the console entry point

    @contextlib.contextmanager
    def paused(self):
        """Around a whole command: no collections until :meth:`settle`."""
        if self._active or gc.get_freeze_count():
            yield  # a command inside a command, or a caller that manages freezing itself
            return
        self._active, self._was_enabled = True, gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            self._active = False
            if not self.process_ends_after:
                gc.unfreeze()
            if self._was_enabled:
                gc.enable()

    def settle(self, *, collect: bool = False) -> None:
        """Freeze what is alive now and collect again from here on: once the imports are done,
        with ``collect`` (one full collection frees the tens of MB of garbage torch's import
        leaves while the collector is paused), and again once the model and data are loaded."""
        if not self._active:
            return
        if collect:
            gc.collect()
        gc.freeze()
        if self._was_enabled:
            gc.enable()


SETUP_GC = SetupGC()
