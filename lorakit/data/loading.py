"""Reading dataset rows from files or the hub, with errors that name the file and line."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_DIR = Path(__file__).parent / "builtin"
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Row:
    """One example as read, with where it came from (for error messages)."""
    data: dict
    source: str  # "file.jsonl:12" or "hub-id[12]"
    folder: Path | None = None  # the data file's folder: relative paths in the row (images) start there


def resolve_builtin(spec: str) -> str:
    """`builtin:NAME` -> the path of a dataset shipped in lorakit/data/builtin."""
    if not spec.startswith("builtin:"):
        return spec
    path = BUILTIN_DIR / f"{spec.removeprefix('builtin:')}.jsonl"
    if not path.is_file():
        names = sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no built-in dataset {spec!r}; built-in datasets: "
                                f"{['builtin:' + n for n in names]}")
    return str(path)


def read_rows(spec: str) -> list[Row]:
    """All rows of a dataset file (.jsonl/.json/.csv/.parquet) or hub dataset id."""
    spec = resolve_builtin(spec)
    path = Path(spec)
    if path.suffix.lower() in FILE_TYPES or path.exists() or spec.startswith((".", "/", "~")):
        path = path.expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {spec}")
        suffix = path.suffix.lower()
        if suffix not in FILE_TYPES:
            raise ValueError(f"{spec}: unsupported file type {suffix!r}; accepted: "
                             f"{', '.join(FILE_TYPES)}")
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        return _read_with_datasets(FILE_TYPES[suffix], str(path))
    return _read_hub(spec)


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading BOM is dropped); otherwise an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); the file "
                         "must be UTF-8: re-save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8)") from None


def _read_json(path: Path) -> list[Row]:
    """A JSON array of objects, or one JSON object per line (JSONL)."""
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None
        rows = [Row(item, f"{path}[{i}]", path.parent) for i, item in enumerate(items)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(Row(json.loads(line), f"{path}:{lineno}", path.parent))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg} at column "
                                 f"{err.colno}); expected one JSON object per line") from None
    for row in rows:
        if not isinstance(row.data, dict):
            raise ValueError(f"{row.source}: expected a JSON object, got {type(row.data).__name__}")
    return rows


def _read_csv(path: Path) -> list[Row]:
    """A CSV file with a header row; every cell is text as written, an empty cell is None."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    for data in reader:
        if None in data:
            raise ValueError(f"{path}:{reader.line_num}: more cells than the header has columns")
        rows.append(Row({key: value or None for key, value in data.items()}, f"{path}:{reader.line_num}", path.parent))
    return rows


def _read_with_datasets(builder: str, data_files: str) -> list[Row]:
    import datasets

    datasets.disable_progress_bars()
    table = datasets.load_dataset(builder, data_files=data_files, split="train")
    return [Row(dict(item), f"{data_files}:row {i}", Path(data_files).parent) for i, item in enumerate(table, start=1)]


def _read_hub(dataset_id: str) -> list[Row]:
    from lorakit.io.hub import require_hub

    require_hub(f"dataset {dataset_id!r}", "a local .jsonl/.json/.csv/.parquet file")
    import datasets

    table = datasets.load_dataset(dataset_id, split="train")
    return [Row(dict(item), f"{dataset_id}[{i}]") for i, item in enumerate(table)]
