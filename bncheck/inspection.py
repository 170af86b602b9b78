"""``bncheck.inspect``: the checks that need no data."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .run import require_running_stats
from .findings import Evidence, find_causes
from .frameworks import adapter_for
from .layer_report import forget_update_counts, measure_layer
from .report import Finding, LayerReport, Severity, Verdict


@dataclass(frozen=True)
class InspectionReport:
    verdict: Verdict
    framework: str
    layers: tuple[LayerReport, ...]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


def inspect(model: Any, *, missing_running_stats: tuple[str, ...] = (), notes: tuple[str, ...] = (),
            missing_update_counts: tuple[str, ...] = ()) -> InspectionReport:
    """Init-valued or missing statistics, momentum, frozen layers and shared modules, from the model alone.

    ``missing_update_counts`` names layers whose ``num_batches_tracked`` a checkpoint lacked: their
    counter (0 after loading) is unknown, not a count. The verdict fails only on error-severity findings.
    """
    adapter = adapter_for(model)
    layers = adapter.norm_layers()
    require_running_stats(adapter, layers)
    uses = _module_uses(model)
    reports = []
    for layer in layers:
        report = measure_layer(layer, None, forwards=0, initial_training=layer.is_training)
        reports.append(replace(report, calls_per_forward=float(uses.get(id(layer.source_module), 1))))
    reports = forget_update_counts(reports, missing_update_counts)
    evidence = Evidence(layers=reports, missing_running_stats=missing_running_stats,
                        framework=adapter.framework)
    findings = find_causes(evidence)
    failed = any(f.severity is Severity.ERROR for f in findings)
    return InspectionReport(Verdict.FAIL if failed else Verdict.PASS, adapter.framework, reports, findings,
                            tuple(notes))


def _module_uses(model: Any) -> dict[int, int]:
    """How many places in the module tree hold each module: a shared norm layer is called from each."""
    named = getattr(model, "named_modules", None)
    if named is None:
        return {}
    counts: dict[int, int] = {}
    try:
        entries = named(remove_duplicate=False)
    except TypeError:
        return {}
    for _name, module in entries:
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts
