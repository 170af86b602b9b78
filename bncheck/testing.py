"""A gate for the user's own test suite, in the style of ``torch.testing.assert_close``."""
from __future__ import annotations

from typing import Any

from .diagnosis import DEFAULT_MAX_GAP, diagnose
from .findings import DRIFT_HIGH
from .report import Report, Severity


def assert_bn_consistent(
    model: Any,
    data: Any,
    *,
    max_gap: float = DEFAULT_MAX_GAP,
    max_drift: float | None = None,
    fail_on_error_findings: bool = False,
    device: str = "cpu",
    **options: Any,
) -> Report:
    """Assert that eval-mode BatchNorm agrees with train-mode BatchNorm on ``data``.

    Fails when the train-minus-eval accuracy gap (relative loss gap without
    accuracy) exceeds ``max_gap``, when ``max_drift`` is given and a layer's drift
    exceeds it, or, with ``fail_on_error_findings``, on any error-severity finding.
    Returns the :class:`~bncheck.report.Report` when the model passes. Other
    keyword arguments go to :func:`bncheck.diagnose`.
    """
    __tracebackhide__ = True
    report = diagnose(model, data, max_gap=max_gap, device=device, **options)
    problems = []
    if not report.gate.passed:
        problems.append(_gap_line(report))
    drift_limit = DRIFT_HIGH if max_drift is None else max_drift
    over = [l for l in report.layers if l.drift is not None and l.drift > drift_limit]
    if max_drift is not None and over:
        problems.append(f"{len(over)} / {len(report.layers)} layers over drift threshold")
    errors = [f for f in report.findings if f.severity is Severity.ERROR]
    if fail_on_error_findings and errors:
        problems.append(f"{len(errors)} error finding(s)")
    if not problems:
        return report
    lines = ["BatchNorm train/eval check failed: " + "; ".join(problems)]
    if over:
        allowed = f", allowed {drift_limit:g}" if max_drift is not None else ""
        lines.append(f"{len(over)} / {len(report.layers)} layers over drift {drift_limit:g}; worst: {over[0].name} "
                     f"(drift {over[0].drift:.3g}{allowed})")
    lines += [f"{f.severity.value} {f.code}: {f.message} Fix: {f.fix}" for f in report.findings
              if f.severity is not Severity.INFO]
    raise AssertionError("\n".join(lines))


def _gap_line(report: Report) -> str:
    gate = report.gate
    if gate.metric == "accuracy":
        return (f"accuracy gap {gate.value * 100:.1f} pts (train-mode {report.metrics.train.accuracy:.1%}, "
                f"eval {report.metrics.eval.accuracy:.1%}; allowed {gate.threshold * 100:.1f} pts)")
    return f"{gate.metric.replace('_', ' ')} {gate.value:.3g} (allowed {gate.threshold:g})"
