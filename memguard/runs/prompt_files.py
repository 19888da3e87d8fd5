"""Prompt files of any format memorization papers ship (text, JSONL, CSV or parquet), read into :class:`Prompts`:
each prompt with its group, references subfolder and the file's other columns.

Prompt files, by suffix:

- ``.jsonl``: one JSON object per line; the prompt is its ``prompt``, ``caption`` or ``text`` field (or
  ``prompt_column``);
- ``.csv``: a header row, then one row per prompt; the delimiter (``,`` or ``;``) is sniffed, an unnamed
  column (an index written by pandas: empty name or ``Unnamed: 0``) is left out, the prompt column is found
  by name (``prompt``, ``caption`` or ``text``, any case) or named by ``prompt_column``; a cell holding a
  Python list (``"['http://a', 'http://b']"``) is read as a list, other cells stay strings;
- ``.parquet`` (pandas with pyarrow): as a CSV, with the file's own types;
- anything else is text: one prompt per line, blank lines skipped. A text file whose lines are records (a
  CSV header, delimited fields with URLs, JSON objects) is refused: its header would become a prompt.
  With ``prompt_column`` set, such a file is read as CSV.

Every file may have a UTF-8 BOM and Windows line endings. The group of a prompt is its ``group`` column (or
``group_column``); ``references_per_prompt`` names the column of its references subfolder (``_row``: the
prompt's row number in the file, 0-based, for a file whose only key is pandas' unnamed index, as MemBench's).
The remaining columns (labels, URLs, indices, scores) are kept per prompt in :attr:`Prompts.fields`.

Every file may have a UTF-8 BOM and Windows line endings. The group of a prompt is its ``group`` column (or
``group_column``); ``references_per_prompt`` names the column of its references subfolder (``_row``: the
prompt's row number in the file, 0-based, for a file whose only key is pandas' unnamed index, as MemBench's).
The remaining columns (labels, URLs, indices, scores) are kept per prompt in :attr:`Prompts.fields`.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memguard.errors import UserError

PROMPT_FIELDS = ("prompt", "caption", "text")
DELIMITERS = (",", ";")
GROUP_COLUMN = "group"
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")
URL = re.compile(r"^\[?['\"]?(https?://|www\.)", re.IGNORECASE)
UNNAMED = re.compile(r"^(Unnamed: \d+)?$")  # a pandas-written index column: no name, or pandas' own
ROW_KEY = "_row"  # references_per_prompt=_row: the prompt's row number in its file (0-based)


@dataclass
class Prompts:
    """The prompts, and per prompt its group, its own references subfolder (None where not given) and the
    prompt file's other columns (``fields``: column -> value; empty for prompts from the config or a text
    file). ``blank_lines``: line numbers of the blank lines skipped in the file; ``source``: how it was read."""

    texts: list[str]
    groups: list[str | None]
    reference_keys: list[str | None]
    fields: list[dict[str, Any]] | None = None
    blank_lines: list[int] = field(default_factory=list)
    source: str | None = None
    warnings: list[str] = field(default_factory=list)  # what reading found that a run should say (unlabelled prompts)
    n_controls: int = 0  # the last n_controls prompts are control prompts (control_prompts_file)

    def __post_init__(self) -> None:
        if self.fields is None:
            self.fields = [{} for _ in self.texts]


@dataclass
class Columns:
    """Which columns of a record file are the prompt, the group and the references key."""

    prompt: str | None = None  # prompt_column (None: the first of PROMPT_FIELDS, any case)
    group: str | None = None  # group_column (None: "group" where the file has it)
    key: str | None = None  # references_per_prompt


# ---------------------------------------------------------------------------------------------------------------
# Reading the files


def file_key(path: Path) -> str:
    """How errors name a prompt file: ``prompts_file='PATH'``."""
    return f"prompts_file={str(path)!r}"


def _decode(path: Path) -> str:
    """The file's text: UTF-8 with or without a BOM."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{file_key(path)} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err


def _split(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter), [])


def _records_reason(lines: list[str]) -> tuple[str, str] | None:
    """Why a text file's lines look like records rather than prompts, and the fix; or None."""
    rows = [line for line in lines if line.strip()][:200]
    if not rows:
        return None
    for d in DELIMITERS:
        header = [c.strip() for c in _split(rows[0], d)]
        if len(header) >= 2 and any(c.lower() in PROMPT_FIELDS for c in header) and max(map(len, header)) <= 40:
            widths = Counter(len(_split(r, d)) for r in rows[1:])
            if not widths or widths[len(header)] >= len(rows[1:]) / 2:
                return (f"its first line {rows[0][:60]!r} is a CSV header",
                        "rename it to .csv, or give prompt_column=NAME to read it as CSV")
    for d in DELIMITERS:
        widths = Counter(n for r in rows if (n := len(cells := _split(r, d))) >= 2
                         and any(URL.match(c.strip()) for c in cells))
        if widths and (common := widths.most_common(1)[0])[1] > len(rows) / 2:
            return (f"{common[1]} of its first {len(rows)} lines are {common[0]} {d!r}-separated fields with URLs",
                    "give it a header row naming the columns (the prompt's: prompt) and rename it to .csv")
    if sum(r.lstrip().startswith("{") for r in rows) > len(rows) / 2:
        return "its lines are JSON objects", "rename it to .jsonl"
    return None


def _read_text(path: Path) -> Prompts:
    lines = _decode(path).splitlines()
    found = _records_reason(lines)
    if found is not None:
        raise UserError(f"{file_key(path)} is read as text, one prompt per line, but {found[0]}: {found[1]}")
    texts = [line.strip() for line in lines if line.strip()]
    blank = [i for i, line in enumerate(lines, 1) if not line.strip()]
    return Prompts(texts, [None] * len(texts), [None] * len(texts), blank_lines=blank, source="text, one per line")


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]], list[int]]:
    columns: dict[str, None] = {}
    rows, blank = [], []
    for number, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            blank.append(number)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{file_key(path)} line {number} is not a JSON object ({err.msg}); give one object per "
                            f"line with one of the fields {', '.join(PROMPT_FIELDS)}") from err
        if not isinstance(row, dict):
            raise UserError(f"{file_key(path)} line {number} is not a JSON object with one of the fields "
                            f"{', '.join(PROMPT_FIELDS)}")
        columns.update(dict.fromkeys(row))
        rows.append((number, row))
    return list(columns), rows, blank


def _sniff(text: str) -> str:
    """The delimiter (``,`` or ``;``) under which the header is widest and the first rows have its width."""
    def score(d: str) -> tuple[float, int]:
        rows = [r for r in _first(csv.reader(io.StringIO(text, newline=""), delimiter=d), 50) if any(c.strip() for c in r)]
        if not rows or len(rows[0]) < 2:
            return (0.0, 0)
        return (sum(len(r) == len(rows[0]) for r in rows) / len(rows), len(rows[0]))
    return max(DELIMITERS, key=score)


def _first(rows: Iterable[list[str]], n: int) -> Iterator[list[str]]:
    for i, row in enumerate(rows):
        if i == n:
            return
        yield row


def _cell(value: str | None) -> Any:
    """A CSV cell: None where empty or missing, a list where it holds a Python list literal, else the string."""
    if value is None:
        return None
    stripped = value.strip()
    if not stripped:
        return None
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
        return parsed if isinstance(parsed, list) else value
    return value


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]], list[int], str]:
    text = _decode(path)
    delimiter = _sniff(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows, blank = [], []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                blank.append(line)
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) > len(header):
                raise UserError(f"{file_key(path)} line {line} has {len(cells)} {delimiter!r}-separated fields, the header "
                                f"{len(header)}: quote the cells that contain {delimiter!r} (\"...\")")
            rows.append((line, {h: c for h, c in zip(header, cells) if not UNNAMED.match(h)}))
    except csv.Error as err:
        raise UserError(f"{file_key(path)} line {reader.line_num} is not valid CSV ({err}); check its quotes") from err
    if header is None:
        return [], [], blank, delimiter
    return [h for h in header if not UNNAMED.match(h)], rows, blank, delimiter


def _plain(value: Any) -> Any:
    """A parquet value as plain Python: arrays as lists, numpy scalars as numbers, NaN and NA as None."""
    import pandas as pd  # start-up: pandas loads only for a CSV or parquet prompt file

    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    import pandas as pd  # start-up: pandas loads only for a CSV or parquet prompt file

    try:
        frame = pd.read_parquet(path)
    except ImportError as err:
        raise UserError(f"{file_key(path)}: reading parquet needs pyarrow ({err}); pip install pyarrow") from err
    except Exception as err:  # pyarrow's errors (ArrowInvalid, ...) are not one class
        raise UserError(f"{file_key(path)} cannot be read as parquet ({type(err).__name__}: {err})") from err
    columns = [str(c) for c in frame.columns]
    rows = [(number, {c: _plain(v) for c, v in zip(columns, values)})
            for number, values in enumerate(frame.itertuples(index=False, name=None), 1)]
    return columns, rows


def _column(path: Path, columns: list[str], name: str, key: str) -> str:
    """``name`` among the file's columns (exact, else in any case), or a UserError naming ``key``."""
    if name in columns:
        return name
    folded = [c for c in columns if c.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    raise UserError(f"{file_key(path)} has no column {name!r} ({key}={name}); its columns: {', '.join(columns) or 'none'}")


def _prompt_column(path: Path, columns: list[str], given: str | None) -> str:
    if given is not None:
        return _column(path, columns, given, "prompt_column")
    for name in PROMPT_FIELDS:
        found = [c for c in columns if c.lower() == name]
        if found:
            return found[0]
    raise UserError(f"{file_key(path)} has no prompt column (one named {', '.join(PROMPT_FIELDS)}); its columns: "
                    f"{', '.join(columns) or 'none'}; give prompt_column=NAME")


def _from_rows(path: Path, kind: str, columns: list[str], rows: list[tuple[int, dict[str, Any]]],
               wanted: Columns, where: str, cell: Any = None) -> Prompts:
    """Prompts from the rows of a CSV or parquet file (one set of columns for every row); ``cell`` reads the
    values of the other columns (CSV: :func:`_cell`); the prompt is kept as written."""
    cell = cell or (lambda value: value)
    if not rows:
        raise UserError(f"{file_key(path)} has no rows{' (only a header)' if columns else ''}: no prompts")
    prompt = _prompt_column(path, columns, wanted.prompt)
    group = _column(path, columns, wanted.group, "group_column") if wanted.group is not None else \
        next((c for c in columns if c.lower() == GROUP_COLUMN), None)
    key = _column(path, columns, wanted.key, "references_per_prompt") if wanted.key is not None else None
    texts, groups, keys, fields = [], [], [], []
    for number, row in rows:
        value = row.get(prompt)
        if value is None or not str(value).strip():  # a CSV's missing trailing cell, an empty one, parquet's null
            raise UserError(f"{file_key(path)} {where} {number} has an empty prompt (column {prompt!r}); fill it or "
                            "delete the row")
        if key is not None and (row.get(key) is None or not str(row[key]).strip()):
            raise UserError(f"{file_key(path)} {where} {number} has no value in column {key!r} "
                            f"(references_per_prompt={wanted.key})")
        texts.append(str(value))
        label = None if group is None else cell(row.get(group))
        groups.append(None if label is None else str(label))
        keys.append(None if key is None else str(row[key]).strip())
        fields.append({c: cell(v) for c, v in row.items() if c != prompt})
    others = [c for c in columns if c != prompt]
    source = f"{kind}, prompt column {prompt!r}" + (f", also {', '.join(others)}" if others else "")
    return Prompts(texts, groups, keys, fields, source=source)


def _from_jsonl(path: Path, rows: list[tuple[int, dict[str, Any]]], wanted: Columns) -> Prompts:
    """Prompts from JSONL objects: each line's own fields."""
    if not rows:
        raise UserError(f"{file_key(path)} is empty: no prompts")
    texts, groups, keys, fields = [], [], [], []
    for number, row in rows:
        names = list(row)
        if wanted.prompt is not None:
            prompt = next((c for c in (wanted.prompt, *[n for n in names if n.lower() == wanted.prompt.lower()])
                           if c in row), None)
            if prompt is None:
                raise UserError(f"{file_key(path)} line {number} has no field {wanted.prompt!r} "
                                f"(prompt_column={wanted.prompt}); its fields: {', '.join(names)}")
        else:
            prompt = next((n for f in PROMPT_FIELDS for n in names if n.lower() == f), None)
            if prompt is None:
                raise UserError(f"{file_key(path)} line {number} is not a JSON object with one of the fields "
                                f"{', '.join(PROMPT_FIELDS)} (its fields: {', '.join(names) or 'none'}); "
                                "give prompt_column=NAME")
        if row[prompt] is None or not str(row[prompt]).strip():
            raise UserError(f"{file_key(path)} line {number} has an empty prompt (field {prompt!r})")
        if wanted.key is not None and row.get(wanted.key) is None:
            raise UserError(f"{file_key(path)} line {number} has no field {wanted.key!r} "
                            f"(references_per_prompt={wanted.key})")
        group_name = wanted.group or GROUP_COLUMN
        if wanted.group is not None and group_name not in row:
            raise UserError(f"{file_key(path)} line {number} has no field {group_name!r} (group_column={group_name})")
        texts.append(str(row[prompt]))
        groups.append(None if row.get(group_name) is None else str(row[group_name]))
        keys.append(None if wanted.key is None else str(row[wanted.key]))
        fields.append({c: v for c, v in row.items() if c != prompt})
    return Prompts(texts, groups, keys, fields, source="jsonl")


def read_prompts_file(path: Path, wanted: Columns | None = None) -> Prompts:
    """The prompts of a ``.jsonl``, ``.csv``, ``.parquet`` or text file (module docstring). ``wanted``: the
    configured ``prompt_column``, ``group_column`` and ``references_per_prompt``."""
    wanted = wanted or Columns()
    if wanted.key == ROW_KEY:
        loaded = read_prompts_file(path, replace(wanted, key=None))
        return replace(loaded, reference_keys=[str(i) for i in range(len(loaded.texts))])
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        _, rows, blank = _read_jsonl(path)
        return replace(_from_jsonl(path, rows, wanted), blank_lines=blank)
    if suffix == ".parquet":
        return _from_rows(path, "parquet", *_read_parquet(path), wanted, "row")
    if suffix == ".csv" or wanted.prompt is not None:
        columns, rows, blank, delimiter = _read_csv(path)
        if not columns and not rows:
            raise UserError(f"{file_key(path)} is empty: no prompts")
        loaded = _from_rows(path, f"csv, {delimiter!r}-separated", columns, rows, wanted, "line", _cell)
        return replace(loaded, blank_lines=blank)
    for key, value in (("group_column", wanted.group), ("references_per_prompt", wanted.key)):
        if value is not None:
            raise UserError(f"{key}={value} needs a prompt file with columns ({', '.join(RECORD_SUFFIXES)}); "
                            f"{file_key(path)} is read as text, one prompt per line")
    loaded = _read_text(path)
    if not loaded.texts:
        raise UserError(f"{file_key(path)} is empty: no prompts; give one prompt per line")
    return loaded
