"""Text the user brings: a plain text file, a JSON-lines file, or a local `datasets` dataset.

Calibration on the user's own domain (code, chat, legal text) prunes what that domain does not use,
and evaluation on it measures what the user cares about. Every source is read into one string plus
a fingerprint (sha256 of the bytes it came from), so reports can name exactly what was used and
caches never confuse two versions of a file. Nothing is fetched: a name that is not a local path
is an error, never a hub download.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CalibrationDataError

#: Files read as records (one text per record, from `field`) rather than as plain text.
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
DATASET_FILE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
#: Fewer characters than this cannot fill even a short calibration window.
MIN_CHARS = 200


@dataclass(frozen=True)
class TextSource:
    """A user's text, read: the label reports use, what it was, and a fingerprint of its bytes."""

    label: str
    path: str
    kind: str  # "text", "jsonl" or "dataset"
    field: str | None
    sha256: str
    text: str

    def describe(self) -> dict:
        return {"source": self.path, "kind": self.kind, "field": self.field, "sha256": self.sha256}


def _digest_files(files: list[Path]) -> str:
    """A single file's own sha256 (what `sha256sum` prints); a folder's, over its files' names and
    hashes."""
    from .zoo import file_sha256

    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("|".join(f"{f.name}:{file_sha256(f)}" for f in sorted(files)).encode()).hexdigest()


def _field_texts(records, field: str, where: str, columns) -> list[str]:
    if field not in columns:
        raise CalibrationDataError(
            f"{where} has no field {field!r} (it has {sorted(columns)}). Fix: name the text field "
            "with --text-field (text_field= in the API)"
        )
    texts = [r for r in records if isinstance(r, str)]
    if len(texts) != len(records):
        raise CalibrationDataError(f"{where}: field {field!r} holds values that are not strings")
    return texts


def _read_jsonl(path: Path, field: str) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    stripped = raw.strip()
    if path.suffix == ".json" and stripped.startswith("["):  # a JSON array of records
        try:
            rows = json.loads(stripped)
        except ValueError as err:
            raise CalibrationDataError(
                f"{path} is not valid JSON ({err}). Fix: one JSON record per line"
            ) from err
    else:
        rows = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise CalibrationDataError(
                    f"{path}, line {number}, is not a JSON record ({err}). Fix: one JSON object per line"
                ) from err
    if not all(isinstance(r, dict) for r in rows):
        raise CalibrationDataError(f"{path}: every record must be a JSON object with a {field!r} field")
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = [i for i, r in enumerate(rows, 1) if field not in r]
    if field in columns and missing:
        raise CalibrationDataError(f"{path}: records {missing[:5]} have no {field!r} field")
    return _field_texts([r.get(field) for r in rows], field, str(path), columns)


def _read_dataset(path: Path, field: str) -> list[str]:
    import datasets

    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:
            builder = DATASET_FILE_SUFFIXES[path.suffix]
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many kinds for folders it cannot read
        raise CalibrationDataError(
            f"{path} cannot be read as a local datasets dataset ({type(err).__name__}: {err}). Fix: pass "
            "a folder written by Dataset.save_to_disk, or a .parquet / .csv / .jsonl / .txt file"
        ) from err
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data)) if len(data) == 1 else None
        if split is None:
            raise CalibrationDataError(
                f"{path} holds the splits {sorted(data)} and none is 'train'. Fix: save the split you "
                "mean on its own (dataset[split].save_to_disk(...))"
            )
        data = data[split]
    return _field_texts(
        list(data[field]) if field in data.column_names else [], field, str(path), data.column_names
    )


def _read_plain(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise CalibrationDataError(
            f"{path} is a binary file, not text. Fix: pass a UTF-8 text, JSON-lines or dataset file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationDataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}). Fix: convert it to UTF-8"
        ) from err


def check_text_source(source: str | os.PathLike) -> Path:
    """A text source exists and is a regular file or a folder: checked before a model is loaded,
    since a named pipe or a device (`/dev/zero`) would make the read wait forever or never end."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CalibrationDataError(
            f"text source {str(source)!r} does not exist. Fix: pass a local file or dataset folder "
            "(nothing is downloaded)"
        )
    if not path.is_dir() and not path.is_file():
        raise CalibrationDataError(
            f"text source {str(source)!r} is not a regular file or folder (a named pipe, socket or "
            "device); reading it could wait forever or never end. Fix: save the text to a file and "
            "pass that file"
        )
    return path


def read_text_source(source: str | os.PathLike, text_field: str = "text") -> TextSource:
    """Read a local text source into one string (records joined by blank lines), with its sha256.

    `source`: a `.txt` (or any other UTF-8) file, a `.jsonl` / `.json` file of records whose
    `text_field` holds the text, a `.parquet` / `.csv` / `.arrow` file, or a `save_to_disk` folder."""
    path = check_text_source(source)
    if path.is_dir():
        kind, texts = "dataset", _read_dataset(path, text_field)
        digest = _digest_files([p for p in path.rglob("*") if p.is_file()])
    elif path.suffix in DATASET_FILE_SUFFIXES:
        kind, texts, digest = "dataset", _read_dataset(path, text_field), _digest_files([path])
    elif path.suffix in JSONL_SUFFIXES:
        kind, texts, digest = "jsonl", _read_jsonl(path, text_field), _digest_files([path])
    else:
        kind, texts, digest = "text", [_read_plain(path)], _digest_files([path])
    text = "\n\n".join(t.strip() for t in texts if t.strip())
    if len(text) < MIN_CHARS:
        raise CalibrationDataError(
            f"{path} holds {len(text)} characters of text{'' if text else ' (it is empty)'}; at least "
            f"{MIN_CHARS} are needed. Fix: pass a longer text"
        )
    return TextSource(
        label=path.name,
        path=str(path),
        kind=kind,
        field=None if kind == "text" else text_field,
        sha256=digest,
        text=text,
    )
