"""JSON Lines files of string records, read with errors that name the file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from kiln.errors import DataError


def read_utf8(path: Path, what: str, fix: str) -> str:
    """The text of ``path``; a missing, unreadable or non-UTF-8 file is a DataError.

    ``what`` names the file's role in the message ("chain-of-thought data") and ``fix`` says
    what to change ("fix objectives.cot.path").
    """
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8 JSON Lines"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {what} {path} ({exc.strerror or exc}); {fix}") from exc


def jsonl_source(
    path: str, packaged: tuple[str, str], what: str, fix: str
) -> tuple[str, str]:
    """(where, text) of a JSONL source named in a config.

    ``packaged`` is (config value, file under ``kiln/data``): that value selects the file Kiln
    ships; anything else is a path, read with ``read_utf8(path, what, fix)``.
    """
    name, packaged_file = packaged
    if path == name:
        source = resources.files("kiln.data").joinpath(packaged_file)
        return f"packaged {what}", source.read_text(encoding="utf-8")
    file = Path(path).expanduser()
    return str(file), read_utf8(file, what, fix)


def string_records(
    text: str, label: str, fields: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, str]]]:
    """``(where, record)`` for each non-blank line: an object whose values are non-empty strings.

    Every record must have exactly ``fields``. ``where`` is "<label>, line <n>", for messages
    about the record that only its user can check.
    """
    # Split on "\n" only: str.splitlines() also breaks at U+2028, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{label}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object with {', '.join(fields)}, "
                f"got {type(record).__name__}"
            )
        unknown = sorted(set(record) - set(fields))
        if unknown:
            raise DataError(
                f"{where}: field {unknown[0]!r} is not known; the fields are {', '.join(fields)}"
            )
        for name in fields:
            if name not in record:
                raise DataError(f"{where}: field {name!r} is missing; every record needs it")
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}"
                )
        yield where, record
