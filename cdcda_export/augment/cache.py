"""Response cache: one atomic JSON file per teacher reply, keyed by what determines the reply.

The key is a sha256 over (template version and hash, model, generation parameters, messages,
attempt number). A killed run leaves only complete entries (temp file + rename), so a rerun asks
the teacher only for replies it never received.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..utils import write_json_atomic


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # cannot happen with atomic writes; treat as absent rather than crash

    def put(self, key: str, entry: dict) -> None:
        write_json_atomic(self._path(key), entry, indent=None)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
