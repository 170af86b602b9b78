"""Plain-data views of result records for the JSON renderer."""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

SCHEMA_VERSION = 1


def plain(value: Any) -> Any:
    """Dataclasses, enums and tuples to JSON-ready values; non-finite floats become None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return plain(value.item())
    return value


def layer_record(layer, *, per_channel: bool) -> dict:
    record = plain(layer)
    channels = record.pop("channels", None)
    if per_channel and channels is not None:
        record.update(channels)
    return record
