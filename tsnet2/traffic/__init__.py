"""The JSONL traffic log (seed-spec §4): pure record formatting plus a file writer.

- :mod:`.records`: ``open``/``data``/``close`` lines as bytes, Go-compatible;
- :mod:`.log`: :class:`TrafficLog` and :class:`Flow` (one ``os.write`` per record);
- ``schema.json``: JSON Schema (draft 2020-12) of a record, see :func:`load_schema`.

See docs/traffic-log.md.
"""

import json
from importlib import resources
from typing import Any

from tsnet2.traffic.log import Flow, LogMode, TrafficLog, TrafficLogError
from tsnet2.traffic.records import (
    DEFAULT_CHUNK_SIZE,
    DataDir,
    FlowDir,
    chunks,
    close_record,
    data_record,
    format_time,
    open_record,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DataDir",
    "Flow",
    "FlowDir",
    "LogMode",
    "TrafficLog",
    "TrafficLogError",
    "chunks",
    "close_record",
    "data_record",
    "format_time",
    "load_schema",
    "open_record",
]


def load_schema() -> dict[str, Any]:
    """Return the traffic-log record JSON Schema shipped in the package (``schema.json``)."""
    text = resources.files(__name__).joinpath("schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
