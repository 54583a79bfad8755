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


def apply_umask(folder: str | Path) -> None:
    """Give every file below a folder the mode the umask gives: libraries that write through temporary files
    (safetensors' weights) leave them readable by their owner alone."""
    mode = umask_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


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
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors become our one line
    # a cache of its own, gone after reading: datasets' shared cache knows a file by its path and mtime, so
    # an edit within the same second would read the old records, and every file read would stay there
    with tempfile.TemporaryDirectory(prefix="jsonl-") as cache:
        try:
            records = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache).to_list()
        except Exception:
            raise UserError(f"{path} is not valid JSONL: {first_bad_line(path)}") from None
    for n, rec in enumerate(records, 1):
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            raise UserError(f"{path}: record {n} has no field {missing[0]!r} "
                            f"(fields: {sorted(k for k, v in rec.items() if v is not None)})")
    return records


def first_bad_line(path: Path) -> str:
    """Where a JSONL file goes wrong, for the user: the first line that is no JSON object."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                return f"line {n} is not a JSON object"
        except json.JSONDecodeError as err:
            return f"line {n}: {err.msg}"
    return "its records do not share one structure (a field holds values of different types)"


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
