"""Samples of one side of a comparison, and comparisons of two sides."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Side:
    label: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p95(self) -> float:
        return percentile(self.samples, 0.95)


@dataclass
class Comparison:
    """Side `a` (this project, or the option under test) against side `b` (the baseline)."""

    row: str
    model: str
    setup: str  # size, steps, clients...
    unit: str  # what the samples measure, e.g. "s/image" (lower is better) or "images/s" (higher is better)
    a: Side
    b: Side
    higher_is_better: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """a / b of the medians."""
        return self.a.median / self.b.median if self.b.samples and self.b.median else float("nan")

    @property
    def speedup(self) -> float:
        """How many times better side a is than side b (>1: a wins), whichever way the unit points."""
        ratio = self.ratio
        return ratio if self.higher_is_better else (1 / ratio if ratio else float("nan"))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("a", "b"):
            side: Side = getattr(self, key)
            data[key] |= {"median": side.median, "p95": side.p95, "n": len(side.samples)}
        return data | {"ratio": self.ratio, "speedup": self.speedup}


@dataclass
class Skipped:
    row: str
    reason: str
