"""``--format json``: the machine-readable report (schema documented in the README)."""
from __future__ import annotations

import json

from .. import __version__
from . import RenderOptions
from .records import SCHEMA_VERSION, layer_record, plain


def _header(kind: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "bncheck_version": __version__, "kind": kind}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


class JsonRenderer:
    def __init__(self, options: RenderOptions = RenderOptions()):
        self.options = options

    def diagnosis(self, report) -> str:
        data = _header("diagnosis")
        data.update({
            "verdict": report.verdict.value,
            "task": report.task,
            "framework": report.framework,
            "device": report.device,
            "metrics": plain(report.metrics),
            "gap": plain(report.gap),
            "gate": plain(report.gate),
            "agreement": plain(report.agreement),
            "output_divergence": plain(report.output_divergence),
            "data": plain(report.data),
            "layers": [layer_record(l, per_channel=self.options.per_channel) for l in report.layers],
            "findings": plain(report.findings),
            "attribution": plain(report.attribution),
            "notes": list(report.notes),
        })
        return _dump(data)

    def inspection(self, report) -> str:
        data = _header("inspection")
        data.update({
            "verdict": report.verdict.value,
            "framework": report.framework,
            "layers": [layer_record(l, per_channel=False) for l in report.layers],
            "findings": plain(report.findings),
            "notes": list(report.notes),
        })
        return _dump(data)

    def recalibration(self, result) -> str:
        data = _header("recalibration")
        data.update(plain(result))
        return _dump(data)
