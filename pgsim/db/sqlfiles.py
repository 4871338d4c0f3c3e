"""pgsim's numbered SQL files, read through importlib.resources from the installed package."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class SqlFile:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def sql_dir() -> Traversable:
    """``pgsim/db/sql``, in a wheel and in a source checkout alike."""
    return resources.files("pgsim.db") / "sql"


def sql_files() -> list[SqlFile]:
    """Every numbered file, in the order it must be applied."""
    found = [entry for entry in sql_dir().iterdir() if FILE_NAME.match(entry.name)]
    return [SqlFile(entry.name, entry.read_text(encoding="utf-8")) for entry in sorted(found, key=lambda e: e.name)]
