"""Result rows of the benchmark: tsnet2's value against the tunnel and against Go tsnet, the
targets with a PASS/MISS verdict each; the printed table and the JSON document."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

CHECKS = ("ratio>=", "ratio<=", "delta<=", "value>=", "value<=")
AGAINST = ("tunnel", "go")
WIDTH = 120
"""The printed table is laid out to fit this many columns; notes go below it."""


def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) with linear interpolation; NaN for no samples."""
    if not samples:
        return float("nan")
    xs = sorted(samples)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(samples: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(samples, 50)


def _known(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of a row.

    ``check`` says what is compared with ``limit``: ``ratio>=`` / ``ratio<=`` (value ÷
    reference), ``delta<=`` (value - reference), ``value>=`` / ``value<=`` (the value alone).
    ``against`` names the reference of a ratio or delta: ``tunnel`` (the row's baseline) or
    ``go`` (the Go tsnet value).
    """

    check: str
    limit: float
    against: str = "tunnel"

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"target check {self.check!r}: want one of {CHECKS}")
        if self.against not in AGAINST:
            raise ValueError(f"target against {self.against!r}: want one of {AGAINST}")

    def text(self, unit: str) -> str:
        """The target as text: ``>=0.9x``, ``>=1x Go``, ``<=+0.25 ms``, ``<=40 MB``."""
        kind, op = self.check[:-2], self.check[-2:]
        ref = " Go" if self.against == "go" and kind != "value" else ""
        if kind == "ratio":
            return f"{op}{self.limit:g}x{ref}"
        if kind == "delta":
            return f"{op}+{self.limit:g} {unit}{ref}"
        return f"{op}{self.limit:g} {unit}"

    def verdict(self, value: float | None, tunnel: float | None, go: float | None) -> str:
        """PASS or MISS; ``n/a`` when a figure it needs was not measured."""
        kind, op = self.check[:-2], self.check[-2:]
        ref = tunnel if self.against == "tunnel" else go
        x: float | None = None
        if kind == "value":
            x = value
        elif _known(value) and _known(ref):
            assert value is not None and ref is not None
            if kind == "delta":
                x = value - ref
            elif ref:
                x = value / ref
        if not _known(x):
            return "n/a"
        assert x is not None
        return "PASS" if (x >= self.limit if op == ">=" else x <= self.limit) else "MISS"


@dataclasses.dataclass
class Row:
    """One line of the result table.

    ``value`` is tsnet2's figure (for an indented reference row, e.g. raw veth, that path's
    figure). ``baseline`` is the tunnel's and ``go_value`` Go tsnet's, both measured in the
    same run. ``targets`` are what the row is judged by; a row without any is informative.
    """

    key: str
    label: str
    unit: str
    value: float | None
    baseline: float | None = None
    go_value: float | None = None
    targets: tuple[Target, ...] = ()
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value ÷ tunnel, when both are known."""
        if not _known(self.value) or not _known(self.baseline) or not self.baseline:
            return None
        assert self.value is not None
        return self.value / self.baseline

    @property
    def delta(self) -> float | None:
        """value - tunnel, when both are known."""
        if not _known(self.value) or not _known(self.baseline):
            return None
        assert self.value is not None and self.baseline is not None
        return self.value - self.baseline

    @property
    def vs_go(self) -> float | None:
        """value ÷ Go tsnet, when both are known."""
        if not _known(self.value) or not _known(self.go_value) or not self.go_value:
            return None
        assert self.value is not None and self.go_value is not None
        return self.value / self.go_value

    @property
    def target(self) -> str:
        """Every target as text, e.g. ``>=0.9x, >=1x Go``; "" for an informative row."""
        return ", ".join(t.text(self.unit) for t in self.targets)

    @property
    def verdicts(self) -> list[str]:
        """One PASS / MISS / n/a per target, in order."""
        return [t.verdict(self.value, self.baseline, self.go_value) for t in self.targets]

    @property
    def verdict(self) -> str:
        """The verdicts joined by ``/`` (``PASS/MISS``), or ``info`` for a row without
        targets."""
        return "/".join(self.verdicts) or "info"

    def as_json(self) -> dict[str, Any]:
        """The row with its derived fields."""
        return {
            "key": self.key, "label": self.label, "unit": self.unit,
            "value": _r(self.value), "baseline": _r(self.baseline), "baseline_name": "tunnel",
            "go_value": _r(self.go_value),
            "ratio": _r(self.ratio), "delta": _r(self.delta), "vs_go": _r(self.vs_go),
            "targets": [{"check": t.check, "limit": t.limit, "against": t.against,
                         "text": t.text(self.unit), "verdict": v}
                        for t, v in zip(self.targets, self.verdicts, strict=True)],
            "target": self.target, "verdict": self.verdict, "note": self.note,
        }


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, nd)


def fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _delta(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if abs(x) < 10 else f"{x:+,.0f}"


HEAD = ("row", "tsnet2", "tunnel", "ratio", "delta", "Go tsnet", "vs Go", "target", "result")
"""The table's columns: ratio and delta are tsnet2 against the tunnel, vs Go is tsnet2 ÷ Go."""


def cells(r: Row) -> tuple[str, ...]:
    """One row's cells in ``HEAD`` order."""
    return (f"{r.label} [{r.unit}]", fmt(r.value), fmt(r.baseline), _ratio(r.ratio),
            _delta(r.delta), fmt(r.go_value), _ratio(r.vs_go), r.target, r.verdict)


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table; the rows' notes follow it as a list."""
    lines = [HEAD, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEAD))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.label.strip()}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md), notes in the last column."""
    out = ["| " + " | ".join((*HEAD, "note")) + " |", "|" + "---|" * (len(HEAD) + 1)]
    for r in rows:
        c = cells(r)
        out.append("| " + " | ".join((c[0].strip(), *c[1:], r.note)) + " |")
    return "\n".join(out)


def summary(rows: Sequence[Row]) -> str:
    """One line: how many targets passed, and which rows missed one."""
    verdicts = [v for r in rows for v in r.verdicts]
    missed = [r.label.strip() for r in rows if "MISS" in r.verdicts]
    line = (f"targets: {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS, "
            f"{verdicts.count('n/a')} n/a")
    return line + (f"; missed: {', '.join(missed)}" if missed else "")
