"""Small JSON files: read (None when absent or unreadable) and written atomically."""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def read_json(path: str) -> Optional[Any]:
    """The file's JSON value, or None when it is missing or not valid JSON."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, data: Any) -> None:
    """Writes ``path.tmp``, syncs it, then renames it over ``path``."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
