"""Reading and writing the project's files: JSONL records, and JSON written atomically."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from core.errors import UserError


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
    """Records of a JSONL file, read by datasets' json loader (a field that some records lack is None in
    them); UserError naming the file for anything malformed."""
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"file '{path}' does not exist; give a JSONL file with one JSON object per line")
    if not path.read_text().strip():
        raise UserError(f"{path} holds no records")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        records = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    except Exception as err:  # pyarrow's parse error (with its row) is the cause
        cause = err.__cause__ or err
        raise UserError(f"{path} is not valid JSONL: {str(cause).strip().splitlines()[0]}") from None
    for n, rec in enumerate(records, 1):
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            raise UserError(f"{path}: record {n} has no field {missing[0]!r} "
                            f"(fields: {sorted(k for k, v in rec.items() if v is not None)})")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
