"""bncheck: find, explain and fix BatchNorm train/eval discrepancies.

The public API is imported lazily so that ``bncheck --help`` never imports torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "diagnose": ("bncheck.diagnosis", "diagnose"),
    "inspect": ("bncheck.inspection", "inspect"),
    "recalibrate": ("bncheck.recalibration", "recalibrate"),
    "Report": ("bncheck.report", "Report"),
    "Finding": ("bncheck.report", "Finding"),
    "LayerReport": ("bncheck.report", "LayerReport"),
    "Verdict": ("bncheck.report", "Verdict"),
    "Severity": ("bncheck.report", "Severity"),
    "BncheckError": ("bncheck.errors", "BncheckError"),
    "InputError": ("bncheck.errors", "InputError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'bncheck' has no attribute {name!r}")
