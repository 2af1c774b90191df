"""Result rows of the benchmark: value against baseline, ratio, target, PASS/MISS; the
printed table and the JSON document."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


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


@dataclasses.dataclass
class Row:
    """One line of the result table.

    ``value`` is tsnet2's figure, ``baseline`` the reference measured in the same run
    (``baseline_name`` says which). ``check`` is how the target is judged:
    ``ratio>=`` (value / baseline), ``delta<=`` (value - baseline), ``value>=`` or
    ``value<=`` (value alone), or "" for an informative row.
    """

    key: str
    label: str
    unit: str
    value: float | None
    baseline: float | None = None
    baseline_name: str = ""
    check: str = ""
    limit: float | None = None
    note: str = ""
    go_value: float | None = None
    """The same measure for the Go tsnet row (tests/bench/gotsnet), when it ran."""

    @property
    def ratio(self) -> float | None:
        """value / baseline, when both are known."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def vs_go(self) -> float | None:
        """value / go_value, when both are known."""
        if self.value is None or not self.go_value:
            return None
        return self.value / self.go_value

    @property
    def delta(self) -> float | None:
        """value - baseline, when both are known."""
        if self.value is None or self.baseline is None:
            return None
        return self.value - self.baseline

    @property
    def target(self) -> str:
        """The target as text, e.g. ``>= 0.95x`` or ``<= +0.25 ms``."""
        if not self.check or self.limit is None:
            return ""
        kind, op = self.check[:-2], self.check[-2:]
        sym = {">=": ">=", "<=": "<="}[op]
        if kind == "ratio":
            return f"{sym} {self.limit:g}x"
        if kind == "delta":
            return f"{sym} +{self.limit:g} {self.unit}"
        return f"{sym} {self.limit:g} {self.unit}"

    @property
    def verdict(self) -> str:
        """PASS, MISS, n/a (no data) or "" (no target)."""
        if not self.check or self.limit is None:
            return ""
        kind, op = self.check[:-2], self.check[-2:]
        x = {"ratio": self.ratio, "delta": self.delta, "value": self.value}[kind]
        if x is None or math.isnan(x):
            return "n/a"
        ok = x >= self.limit if op == ">=" else x <= self.limit
        return "PASS" if ok else "MISS"

    def as_json(self) -> dict[str, Any]:
        """The row with its derived fields."""
        out = dataclasses.asdict(self)
        out.update(ratio=_r(self.ratio), vs_go=_r(self.vs_go), delta=_r(self.delta),
                   target=self.target,
                   verdict=self.verdict)
        return out


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, nd)


def _fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = ("row", "tsnet2", "baseline", "ratio", "delta", "vs Go tsnet", "target", "result",
            "note")
    lines = [head]
    for r in rows:
        base = f"{_fmt(r.baseline)} {r.baseline_name}".strip() if r.baseline is not None else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        delta = "-" if r.delta is None else f"{r.delta:+.3f}" if abs(r.delta) < 10 else \
            f"{r.delta:+,.0f}"
        vs_go = "-" if r.vs_go is None else f"{r.vs_go:.2f}x ({_fmt(r.go_value)})"
        lines.append((f"{r.label} [{r.unit}]", _fmt(r.value), base, ratio, delta, vs_go,
                      r.target, r.verdict, r.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (for docs/benchmarks.md)."""
    out = ["| row | tsnet2 | baseline | ratio | delta | vs Go tsnet | target | result | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = f"{_fmt(r.baseline)} ({r.baseline_name})" if r.baseline is not None else "-"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        delta = "-" if r.delta is None else f"{r.delta:+.3f}" if abs(r.delta) < 10 else \
            f"{r.delta:+,.0f}"
        vs_go = "-" if r.vs_go is None else f"{r.vs_go:.2f}x ({_fmt(r.go_value)})"
        out.append(f"| {r.label} [{r.unit}] | {_fmt(r.value)} | {base} | {ratio} | {delta} | "
                   f"{vs_go} | {r.target} | {r.verdict} | {r.note} |")
    return "\n".join(out)
