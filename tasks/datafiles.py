"""Local data files: which `datasets` builder reads each, and their columns read cheaply
(the launcher's pre-check reads only a file's start, without loading `datasets`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# file suffix -> the `datasets` builder that reads it
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def file_builder(dataset: str) -> str:
    """The `datasets` builder of a local data file; the error names `dataset`."""
    builder = FILE_BUILDERS.get(Path(dataset).suffix.lower())
    if builder is None:
        raise ValueError(
            f"dataset {dataset!r}: a data file must end in {', '.join(FILE_BUILDERS)} "
            "(or give a save_to_disk folder or a hub id)"
        )
    return builder


def file_columns(path: Path, dataset: str) -> list[str]:
    """Column names of a data file from its start: the first JSON line (or the first record
    of a JSON array), the CSV header, the Parquet schema."""
    builder = file_builder(dataset)
    if builder == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open(encoding="utf-8", newline="") as handle:
        if builder == "csv":
            return next(csv.reader(handle), [])
        first = handle.readline()
        try:
            record = json.loads(first)
        except json.JSONDecodeError:  # not JSON lines: one JSON document
            record = json.loads(first + handle.read())
    if isinstance(record, list):
        record = record[0] if record else {}
    if not isinstance(record, dict):
        raise ValueError(
            f"dataset {dataset!r}: expected JSON objects (records), not {record!r:.40}"
        )
    return list(record)
