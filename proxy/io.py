"""Reading and writing the project's files: JSONL records, and JSON written atomically."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from proxy.errors import UserError


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never a half-written one."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def umask_mode(mode: int = 0o666) -> int:
    """What `open()` would create a file with under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file renamed into place; the file gets the mode the umask gives
    (mkstemp makes it 0600, which would hide results from the colleagues sharing a folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Records of a JSONL file; UserError naming the file and line for anything malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"file '{path}' does not exist; give a JSONL file with one JSON object per line")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n} is not valid JSON ({err.msg})") from None
        missing = [k for k in required if k not in rec]
        if missing:
            raise UserError(f"{path}:{n} has no field {missing[0]!r} (fields: {sorted(rec)})")
        records.append(rec)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
