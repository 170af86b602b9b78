"""BatchNorm checks inside training loops.

``bncheck.integrations.lightning`` and ``bncheck.integrations.keras`` each import their framework;
this package imports neither (nor torch), so ``import bncheck.integrations`` stays cheap.
"""


class BNCheckWarning(UserWarning):
    """A training-loop callback found a BatchNorm train/eval discrepancy (``on_fail="warn"`` or ``"stop"``)."""


__all__ = ["BNCheckWarning"]
