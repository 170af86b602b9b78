"""Python's cyclic garbage collector paused while a command sets up, then told to skip what setup made.

Importing torch and torchvision and building the user's model leave about a million Python objects
that live until the process exits. Every full collection walks all of them: 0.5-0.9 s of a
``bncheck`` run went there (measured with ``gc.callbacks``). During a command the collector is
paused until the model and data are loaded; then everything alive is frozen (``gc.freeze``), so the
collections during the passes see only what the passes allocate. Leaving the command undoes both,
so a caller in the same process (a test, a notebook) gets its collector back as it was.
"""
from __future__ import annotations

import contextlib
import gc


class SetupGC:
    def __init__(self):
        self._was_enabled: bool | None = None   # None: not inside a command

    @contextlib.contextmanager
    def paused(self):
        """Around a whole command: no collections until :meth:`settle`."""
        self._was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()
            self._was_enabled = None

    def settle(self) -> None:
        """Setup is over: freeze what it made and collect again from here on."""
        if self._was_enabled is None:
            return
        gc.freeze()
        if self._was_enabled:
            gc.enable()


SETUP_GC = SetupGC()
