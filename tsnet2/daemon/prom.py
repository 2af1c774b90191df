"""The few Prometheus metric types tsnet2d uses, and the text exposition format (0.0.4).

tsnet2d used prometheus_client for this; importing it cost every sidecar about 3 MB of
resident memory, a third of the way past the daemon's idle-memory budget. This module keeps
its API for what `metrics.py` needs (labelled and plain counters, gauges and histograms in
a registry of their own, and families filled by a collector at scrape time) and writes the
same bytes prometheus_client's ``generate_latest`` writes for them, without the
``*_created`` series (tests/unit/test_prom.py compares the two on random operations).

Updates are thread-safe (a lock per series); `Registry.render` takes each series' lock
briefly, so a scrape never sees half an update.
"""

from __future__ import annotations

import abc
import bisect
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Literal, Protocol, TypeVar

Kind = Literal["counter", "gauge", "histogram"]

INF = float("inf")


def format_value(value: float) -> str:
    """A sample value as Go (and so prometheus_client) writes it: ``1.0``, ``0.3``,
    ``1.70000000125e+09``, ``+Inf``."""
    d = float(value)
    if d == INF:
        return "+Inf"
    if d == -INF:
        return "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = zip(names, values, strict=True)
    return "{" + ",".join(f'{n}="{_escape_label(v)}"' for n, v in pairs) + "}"


class Family:
    """One metric family as a scrape sees it: name, help, type and samples."""

    def __init__(self, name: str, documentation: str, kind: Kind,
                 labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.kind = kind
        self.labelnames = tuple(labelnames)
        self.samples: list[tuple[str, tuple[str, ...], tuple[str, ...], float]] = []
        """(name suffix, label names, label values, value)."""

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        """Add one sample with ``labels`` (values for `labelnames`, in order)."""
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, "
                             f"got {len(labels)}")
        suffix = "_total" if self.kind == "counter" else ""
        self.samples.append((suffix, self.labelnames, tuple(labels), float(value)))

    def exposition_name(self) -> str:
        """The name its HELP and TYPE lines use."""
        return self.name + "_total" if self.kind == "counter" else self.name

    def lines(self) -> Iterator[str]:
        """The family in the text format."""
        name = self.exposition_name()
        yield f"# HELP {name} {_escape_help(self.documentation)}\n"
        yield f"# TYPE {name} {self.kind}\n"
        for suffix, names, values, value in self.samples:
            yield f"{self.name}{suffix}{_labels(names, values)} {format_value(value)}\n"


def CounterFamily(name: str, documentation: str,
                  labels: Sequence[str] = ()) -> Family:
    """A counter family for a collector; ``name`` without ``_total`` (it is added)."""
    return Family(name, documentation, "counter", labels)


def GaugeFamily(name: str, documentation: str,
                labels: Sequence[str] = ()) -> Family:
    """A gauge family for a collector."""
    return Family(name, documentation, "gauge", labels)


class Collector(Protocol):
    """Anything a `Registry` asks for families at each scrape."""

    def collect(self) -> Iterable[Family]:
        """The families, with their samples, as of now."""
        ...


class Registry:
    """Collectors in registration order; `render` is the text exposition of them all."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def register(self, collector: Collector, names: Iterable[str] = ()) -> None:
        """Add ``collector``; ``names`` (exposition names) must not be taken already."""
        with self._lock:
            names = set(names)
            clash = names & self._names
            if clash:
                raise ValueError(f"metric already registered: {', '.join(sorted(clash))}")
            self._names |= names
            self._collectors.append(collector)

    def render(self) -> bytes:
        """Every family of every collector in the text exposition format 0.0.4."""
        with self._lock:
            collectors = list(self._collectors)
        return "".join(line for c in collectors for fam in c.collect()
                       for line in fam.lines()).encode("utf-8")


class _Series:
    """One labelled series of a metric: its value under a lock."""

    __slots__ = ("_lock", "value", "values")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.value = 0.0
        self._lock = threading.Lock()


class CounterSeries(_Series):
    """A counter's series."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0)."""
        if amount < 0:
            raise ValueError(f"counters only go up: inc({amount})")
        with self._lock:
            self.value += amount


class GaugeSeries(_Series):
    """A gauge's series."""

    __slots__ = ()

    def set(self, value: float) -> None:
        """Set to ``value``."""
        with self._lock:
            self.value = float(value)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (may be negative)."""
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        with self._lock:
            self.value -= amount


class HistogramSeries(_Series):
    """A histogram's series: a count per bucket (not cumulative), their total, the sum."""

    __slots__ = ("bounds", "counts")

    def __init__(self, values: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        super().__init__(values)
        self.bounds = bounds  # ascending, the last is +Inf
        self.counts = [0.0] * len(bounds)

    def observe(self, amount: float) -> None:
        """Count one observation of ``amount``."""
        i = min(bisect.bisect_left(self.bounds, amount), len(self.bounds) - 1)  # first le >=
        with self._lock:
            self.value += amount  # the sum
            self.counts[i] += 1


S = TypeVar("S", bound=_Series)


class _Metric(abc.ABC, Generic[S]):
    """A metric of `kind` whose series are of type ``S``, in a `Registry`."""

    kind: Kind

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: Registry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], S] = {}
        self._lock = threading.Lock()
        registry.register(self, [self._family().exposition_name()])
        if not self.labelnames:
            self._children[()] = self._new_series(())

    def _family(self) -> Family:
        return Family(self.name, self.documentation, self.kind, self.labelnames)

    @abc.abstractmethod
    def _new_series(self, values: tuple[str, ...]) -> S:
        """A new series, at 0, for these label values."""

    def labels(self, *values: str) -> S:
        """The series for these label values (created, at 0, on first use). An existing
        series costs one dict lookup: hooks call this per flow and per record."""
        child = self._children.get(values)
        if child is not None:
            return child
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, "
                             f"got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._new_series(key)
        return child

    def _series(self) -> list[S]:
        with self._lock:
            return list(self._children.values())

    def collect(self) -> Iterator[Family]:
        """The metric as a family, its series in the order they were created."""
        fam = self._family()
        for s in self._series():
            with s._lock:
                value = s.value
            fam.add_metric(s.values, value)
        yield fam


class Counter(_Metric[CounterSeries]):
    """A counter; ``name`` ends in ``_total``."""

    kind: Kind = "counter"

    def _family(self) -> Family:
        return Family(self.name.removesuffix("_total"), self.documentation, self.kind,
                      self.labelnames)

    def _new_series(self, values: tuple[str, ...]) -> CounterSeries:
        return CounterSeries(values)

    def inc(self, amount: float = 1) -> None:
        """`inc` of the one series of an unlabelled counter."""
        self.labels().inc(amount)


class Gauge(_Metric[GaugeSeries]):
    """A gauge."""

    kind: Kind = "gauge"

    def _new_series(self, values: tuple[str, ...]) -> GaugeSeries:
        return GaugeSeries(values)

    def set(self, value: float) -> None:
        """`set` of the one series of an unlabelled gauge."""
        self.labels().set(value)

    def inc(self, amount: float = 1) -> None:
        """`inc` of the one series of an unlabelled gauge."""
        self.labels().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """`dec` of the one series of an unlabelled gauge."""
        self.labels().dec(amount)


class Histogram(_Metric[HistogramSeries]):
    """A histogram with fixed ``buckets`` (upper bounds; +Inf is added)."""

    kind: Kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: Registry, buckets: Sequence[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct, got {list(buckets)}")
        if bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_series(self, values: tuple[str, ...]) -> HistogramSeries:
        return HistogramSeries(values, self.bounds)

    def observe(self, amount: float) -> None:
        """`observe` of the one series of an unlabelled histogram."""
        self.labels().observe(amount)

    def collect(self) -> Iterator[Family]:
        """The histogram as a family: cumulative buckets, then ``_count`` and ``_sum``."""
        fam = self._family()
        names = (*self.labelnames, "le")
        for s in self._series():
            with s._lock:
                counts, total = list(s.counts), s.value
            running = 0.0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                fam.samples.append(("_bucket", names, (*s.values, format_value(bound)),
                                    running))
            fam.samples.append(("_count", self.labelnames, s.values, running))
            fam.samples.append(("_sum", self.labelnames, s.values, total))
        yield fam
