"""The JSONL traffic log (seed-spec §4): pure record formatting plus a file writer.

- :mod:`.records`: ``open``/``data``/``close`` lines as bytes, Go-compatible, plus the
  additive ``reject`` and ``gap`` kinds;
- :mod:`.log`: :class:`TrafficLog` and :class:`Flow` (one ``os.write`` per record,
  rotation, payload cap, write-failure policy);
- ``schema.json``: JSON Schema (draft 2020-12) of a record, see :func:`load_schema`.

See docs/traffic-log.md.
"""

import json
from importlib import resources
from typing import Any

from tsnet2.traffic.log import ErrorPolicy, Flow, LogMode, TrafficLog, TrafficLogError
from tsnet2.traffic.records import (
    CUT_ERROR,
    DEFAULT_CHUNK_SIZE,
    RECORD_KINDS,
    REJECT_REASONS,
    DataDir,
    FlowDir,
    FlowVia,
    RejectReason,
    chunks,
    close_record,
    data_record,
    format_time,
    gap_record,
    open_record,
    reject_record,
)

__all__ = [
    "CUT_ERROR",
    "DEFAULT_CHUNK_SIZE",
    "RECORD_KINDS",
    "REJECT_REASONS",
    "DataDir",
    "ErrorPolicy",
    "Flow",
    "FlowDir",
    "FlowVia",
    "LogMode",
    "RejectReason",
    "TrafficLog",
    "TrafficLogError",
    "chunks",
    "close_record",
    "data_record",
    "format_time",
    "gap_record",
    "load_schema",
    "open_record",
    "reject_record",
]


def load_schema() -> dict[str, Any]:
    """Return the traffic-log record JSON Schema shipped in the package (``schema.json``)."""
    text = resources.files(__name__).joinpath("schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
