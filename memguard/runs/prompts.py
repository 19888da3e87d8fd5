"""Prompts and seeds of a run: from the config or a prompt file (text, JSONL, CSV or parquet), with each
prompt's group, references subfolder and the file's other columns.

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

A run's prompts (:func:`load_prompts`) are then, in this order:

1. ``prompt_join`` ({file, prompt_column, columns}): the named ``columns`` of another file are added to each
   prompt's fields, matched by prompt text (that file's ``prompt_column``; surrounding whitespace ignored),
   before the group and references columns are read, so these may name a joined column (webster500: NeMo's
   ``type`` labels for Webster's captions). A prompt not in that file keeps none of them (counted in a
   warning); a missing file is a warning (no prompt gets them);
2. ``group_labels`` ({label: group}): each group label renamed (NeMo's ``VM`` -> ``verbatim``); a label it does
   not name is an error naming the file, column and value. ``prompts_group`` gives every prompt of
   ``prompts_file`` one group instead (a text file has no group column);
3. ``prompt_draw``;
4. ``control_prompts_file``: prompts appended after all the others (so the others' indices do not change),
   each in group ``control_group`` (``unmemorized``), without references: the non-memorized prompts that
   detection and the cost of a mitigation are measured on, in the same run.
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

from omegaconf import DictConfig

from memguard.errors import UserError

PROMPT_FIELDS = ("prompt", "caption", "text")
DELIMITERS = (",", ";")
GROUP_COLUMN = "group"
RECORD_SUFFIXES = (".jsonl", ".csv", ".parquet")
URL = re.compile(r"^\[?['\"]?(https?://|www\.)", re.IGNORECASE)
UNNAMED = re.compile(r"^(Unnamed: \d+)?$")  # a pandas-written index column: no name, or pandas' own
SEED_SCHEMES = ("shared", "per_prompt")
ROW_KEY = "_row"  # references_per_prompt=_row: the prompt's row number in its file (0-based)
SEED_STRIDE = 1_000_000  # seed_scheme=per_prompt: prompt i's image for base seed s has seed i * SEED_STRIDE + s


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


def _name(path: Path) -> str:
    return f"prompts_file={str(path)!r}"


def _decode(path: Path) -> str:
    """The file's text: UTF-8 with or without a BOM."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{_name(path)} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err


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
        raise UserError(f"{_name(path)} is read as text, one prompt per line, but {found[0]}: {found[1]}")
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
            raise UserError(f"{_name(path)} line {number} is not a JSON object ({err.msg}); give one object per "
                            f"line with one of the fields {', '.join(PROMPT_FIELDS)}") from err
        if not isinstance(row, dict):
            raise UserError(f"{_name(path)} line {number} is not a JSON object with one of the fields "
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
                raise UserError(f"{_name(path)} line {line} has {len(cells)} {delimiter!r}-separated fields, the header "
                                f"{len(header)}: quote the cells that contain {delimiter!r} (\"...\")")
            rows.append((line, {h: c for h, c in zip(header, cells) if not UNNAMED.match(h)}))
    except csv.Error as err:
        raise UserError(f"{_name(path)} line {reader.line_num} is not valid CSV ({err}); check its quotes") from err
    if header is None:
        return [], [], blank, delimiter
    return [h for h in header if not UNNAMED.match(h)], rows, blank, delimiter


def _plain(value: Any) -> Any:
    """A parquet value as plain Python: arrays as lists, numpy scalars as numbers, NaN and NA as None."""
    import pandas as pd

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
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except ImportError as err:
        raise UserError(f"{_name(path)}: reading parquet needs pyarrow ({err}); pip install pyarrow") from err
    except Exception as err:  # pyarrow's errors (ArrowInvalid, ...) are not one class
        raise UserError(f"{_name(path)} cannot be read as parquet ({type(err).__name__}: {err})") from err
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
    raise UserError(f"{_name(path)} has no column {name!r} ({key}={name}); its columns: {', '.join(columns) or 'none'}")


def _prompt_column(path: Path, columns: list[str], given: str | None) -> str:
    if given is not None:
        return _column(path, columns, given, "prompt_column")
    for name in PROMPT_FIELDS:
        found = [c for c in columns if c.lower() == name]
        if found:
            return found[0]
    raise UserError(f"{_name(path)} has no prompt column (one named {', '.join(PROMPT_FIELDS)}); its columns: "
                    f"{', '.join(columns) or 'none'}; give prompt_column=NAME")


def _from_rows(path: Path, kind: str, columns: list[str], rows: list[tuple[int, dict[str, Any]]],
               wanted: Columns, where: str, cell: Any = None) -> Prompts:
    """Prompts from the rows of a CSV or parquet file (one set of columns for every row); ``cell`` reads the
    values of the other columns (CSV: :func:`_cell`); the prompt is kept as written."""
    cell = cell or (lambda value: value)
    if not rows:
        raise UserError(f"{_name(path)} has no rows{' (only a header)' if columns else ''}: no prompts")
    prompt = _prompt_column(path, columns, wanted.prompt)
    group = _column(path, columns, wanted.group, "group_column") if wanted.group is not None else \
        next((c for c in columns if c.lower() == GROUP_COLUMN), None)
    key = _column(path, columns, wanted.key, "references_per_prompt") if wanted.key is not None else None
    texts, groups, keys, fields = [], [], [], []
    for number, row in rows:
        value = row.get(prompt)
        if value is None or not str(value).strip():  # a CSV's missing trailing cell, an empty one, parquet's null
            raise UserError(f"{_name(path)} {where} {number} has an empty prompt (column {prompt!r}); fill it or "
                            "delete the row")
        if key is not None and (row.get(key) is None or not str(row[key]).strip()):
            raise UserError(f"{_name(path)} {where} {number} has no value in column {key!r} "
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
        raise UserError(f"{_name(path)} is empty: no prompts")
    texts, groups, keys, fields = [], [], [], []
    for number, row in rows:
        names = list(row)
        if wanted.prompt is not None:
            prompt = next((c for c in (wanted.prompt, *[n for n in names if n.lower() == wanted.prompt.lower()])
                           if c in row), None)
            if prompt is None:
                raise UserError(f"{_name(path)} line {number} has no field {wanted.prompt!r} "
                                f"(prompt_column={wanted.prompt}); its fields: {', '.join(names)}")
        else:
            prompt = next((n for f in PROMPT_FIELDS for n in names if n.lower() == f), None)
            if prompt is None:
                raise UserError(f"{_name(path)} line {number} is not a JSON object with one of the fields "
                                f"{', '.join(PROMPT_FIELDS)} (its fields: {', '.join(names) or 'none'}); "
                                "give prompt_column=NAME")
        if row[prompt] is None or not str(row[prompt]).strip():
            raise UserError(f"{_name(path)} line {number} has an empty prompt (field {prompt!r})")
        if wanted.key is not None and row.get(wanted.key) is None:
            raise UserError(f"{_name(path)} line {number} has no field {wanted.key!r} "
                            f"(references_per_prompt={wanted.key})")
        group_name = wanted.group or GROUP_COLUMN
        if wanted.group is not None and group_name not in row:
            raise UserError(f"{_name(path)} line {number} has no field {group_name!r} (group_column={group_name})")
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
            raise UserError(f"{_name(path)} is empty: no prompts")
        loaded = _from_rows(path, f"csv, {delimiter!r}-separated", columns, rows, wanted, "line", _cell)
        return replace(loaded, blank_lines=blank)
    for key, value in (("group_column", wanted.group), ("references_per_prompt", wanted.key)):
        if value is not None:
            raise UserError(f"{key}={value} needs a prompt file with columns ({', '.join(RECORD_SUFFIXES)}); "
                            f"{_name(path)} is read as text, one prompt per line")
    loaded = _read_text(path)
    if not loaded.texts:
        raise UserError(f"{_name(path)} is empty: no prompts; give one prompt per line")
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# From the config


def load_prompts(cfg: DictConfig) -> Prompts:
    """The prompts from ``prompts`` or ``prompts_file`` (with groups, reference keys and other columns from a
    record file), then ``prompt_join``, ``group_labels`` / ``prompts_group``, ``prompt_draw`` and the control
    prompts (module docstring)."""
    if cfg.prompts is not None and cfg.prompts_file is not None:
        raise UserError("both prompts and prompts_file are set (a scenario may set prompts); "
                        "give one of them, e.g. prompts=null prompts_file=FILE")
    wanted = Columns(cfg.get("prompt_column"), cfg.get("group_column"), cfg.references_per_prompt)
    join = cfg.get("prompt_join")
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompts_file={str(cfg.prompts_file)!r} is not a file; give a text file with one prompt "
                            "per line, or a .jsonl, .csv or .parquet file with a prompt (and optional group) per row")
        if join is not None:  # the group and key columns may be joined ones: read after the join
            loaded = read_prompts_file(path, Columns(wanted.prompt, None, wanted.key if wanted.key == ROW_KEY else None))
            loaded = _join(loaded, join, wanted, path)
        else:
            loaded = read_prompts_file(path, wanted)
        loaded = _relabel(loaded, cfg, path)
    else:
        for key, value in (("references_per_prompt", wanted.key), ("prompt_column", wanted.prompt),
                           ("group_column", wanted.group), ("prompt_join", join), ("group_labels", cfg.get("group_labels"))):
            if value is not None:
                raise UserError(f"{key}={value} needs a prompts_file with columns ({', '.join(RECORD_SUFFIXES)})")
        texts = [cfg.prompts] if isinstance(cfg.prompts, str) else [str(p) for p in (cfg.prompts or [])]
        loaded = Prompts(texts, [None] * len(texts), [None] * len(texts))
        if cfg.get("prompts_group") is not None:
            loaded.groups = [str(cfg.prompts_group)] * len(texts)
    if not loaded.texts:
        raise UserError("no prompts: give prompts='[a photo of ..., ...]' or prompts_file=FILE (one prompt per line)")
    return with_controls(draw_prompts(loaded, cfg.get("prompt_draw")), cfg)


def _join(loaded: Prompts, join: Any, wanted: Columns, path: Path) -> Prompts:
    """``prompt_join``: the join file's ``columns`` added to the fields of each prompt whose text is in its
    ``prompt_column``; then the group and references columns read from the fields."""
    file, on = join.get("file"), join.get("prompt_column")
    columns = [str(c) for c in (join.get("columns") or [])]
    if not file or not on or not columns:
        given = ", ".join(k for k in ("file", "prompt_column", "columns") if join.get(k)) or "none"
        raise UserError("prompt_join needs file (another prompt file), prompt_column (its column holding the prompt "
                        f"text) and columns (the columns to take); it has {given}")
    other = Path(str(file)).expanduser()
    warnings = list(loaded.warnings)
    table: dict[str, dict[str, Any]] = {}
    if not other.is_file():
        warnings.append(f"prompt_join.file={str(file)!r} is not a file: no prompt gets its columns "
                        f"({', '.join(columns)}); `memguard fetch` (the same overrides) fetches it")
    else:
        try:
            rows = read_prompts_file(other, Columns(prompt=str(on)))
        except UserError as err:
            raise UserError(_renamed(str(err), other, "prompt_join.file", "prompt_join.prompt_column")) from err
        names = {c for f in rows.fields for c in f}
        absent = [c for c in columns if c not in names]
        if absent:
            raise UserError(f"prompt_join.file={str(file)!r} has no column {', '.join(map(repr, absent))} "
                            f"(prompt_join.columns); its columns: {', '.join(sorted(names))}")
        for text, fields in zip(rows.texts, rows.fields):
            table.setdefault(text.strip(), fields)
    fields = [dict(f) for f in loaded.fields]
    unmatched = 0
    for text, f in zip(loaded.texts, fields):
        row = table.get(text.strip())
        if row is None:
            unmatched += 1
            continue
        f.update({c: row.get(c) for c in columns})
    if unmatched and table:
        warnings.append(f"{unmatched} of {len(loaded.texts)} prompt(s) of {_name(path)} are not in prompt_join.file="
                        f"{str(file)!r} (column {on!r}): they keep no {', '.join(columns)}")
    names = {c for f in loaded.fields for c in f} | set(columns)
    for key, column in (("group_column", wanted.group), ("references_per_prompt", wanted.key)):
        if column is not None and column != ROW_KEY and column not in names:
            raise UserError(f"{key}={column}: neither {_name(path)} nor prompt_join.columns has a column {column!r}; "
                            f"the columns: {', '.join(sorted(names))}")
    group = wanted.group if wanted.group is not None else (GROUP_COLUMN if GROUP_COLUMN in names else None)
    groups = [None if group is None or f.get(group) is None else str(f[group]) for f in fields]
    keys = loaded.reference_keys if wanted.key in (None, ROW_KEY) else \
        [None if f.get(wanted.key) is None else str(f[wanted.key]).strip() for f in fields]
    if wanted.key not in (None, ROW_KEY) and any(k is None for k in keys):
        warnings.append(f"{sum(k is None for k in keys)} prompt(s) have no {wanted.key!r} (references_per_prompt="
                        f"{wanted.key}): evaluation leaves them out of similarity")
    return replace(loaded, groups=groups, reference_keys=keys, fields=fields, warnings=warnings,
                   source=f"{loaded.source}; joined with {other.name} on {on!r}: {', '.join(columns)}")


def _relabel(loaded: Prompts, cfg: DictConfig, path: Path) -> Prompts:
    """``prompts_group`` (one group for every prompt) or ``group_labels`` (each label renamed)."""
    one, labels = cfg.get("prompts_group"), cfg.get("group_labels")
    if one is not None:
        if cfg.get("group_column") is not None or labels is not None:
            raise UserError(f"prompts_group={one} gives every prompt one group; group_column / group_labels are also "
                            "set: give one of them")
        return replace(loaded, groups=[str(one)] * len(loaded.texts))
    if labels is None:
        return loaded
    column = cfg.get("group_column") or GROUP_COLUMN
    join = cfg.get("prompt_join")
    where = f"prompt_join.file={str(join.file)!r}" if join is not None and column in (join.get("columns") or []) \
        else _name(path)
    mapping = {str(k): str(v) for k, v in labels.items()}
    groups = []
    for i, label in enumerate(loaded.groups):
        if label is not None and label not in mapping:
            raise UserError(f"{where}: column {column!r} of prompt {i} holds {label!r}, which group_labels does not "
                            f"name (it maps {', '.join(mapping)}); add {label}: <group> to group_labels or fix the row")
        groups.append(None if label is None else mapping[label])
    unlabelled = sum(g is None for g in groups)
    warnings = loaded.warnings + ([f"{unlabelled} of {len(groups)} prompt(s) have no {column!r} label: no group"]
                                  if unlabelled and unlabelled < len(groups) and cfg.get("prompt_join") is None else [])
    return replace(loaded, groups=groups, warnings=warnings)


def _renamed(message: str, path: Path, key: str, column_key: str | None = None) -> str:
    """A prompt-file error about ``path`` worded for the config ``key`` that names it."""
    message = message.replace(_name(path), f"{key}={str(path)!r}", 1)
    fix = f"give {column_key}=NAME" if column_key else "name its prompt column prompt, caption or text"
    return message.replace("give prompt_column=NAME", fix).replace("(prompt_column=", f"({column_key or 'prompt_column'}=")


def with_controls(loaded: Prompts, cfg: DictConfig) -> Prompts:
    """``control_prompts_file``'s prompts appended, each in group ``control_group``, without references."""
    file = cfg.get("control_prompts_file")
    if file is None:
        return loaded
    group = str(cfg.get("control_group") or "unmemorized")
    path = Path(str(file)).expanduser()
    if not path.is_file():
        raise UserError(f"control_prompts_file={str(file)!r} is not a file; give the control (non-memorized) prompts: "
                        "a text file with one prompt per line, or a .jsonl, .csv or .parquet file with a prompt column")
    try:
        controls = read_prompts_file(path)
    except UserError as err:
        raise UserError(_renamed(str(err), path, "control_prompts_file")) from err
    if group in {g for g in loaded.groups if g is not None}:
        raise UserError(f"control_group={group} is also the group of prompts of prompts_file; give the control prompts "
                        "a group of their own (control_group=NAME)")
    n = len(controls.texts)
    return replace(loaded, texts=loaded.texts + controls.texts, groups=loaded.groups + [group] * n,
                   reference_keys=loaded.reference_keys + [None] * n, fields=loaded.fields + controls.fields,
                   n_controls=n, source=f"{loaded.source or 'the config'}; then {n} control prompt(s) from {path.name} "
                                         f"({controls.source}) in group {group!r}")


def draw_prompts(loaded: Prompts, draw: DictConfig | None) -> Prompts:
    """``prompt_draw`` ({count, seed, replace}): ``count`` prompts drawn as ``numpy.random.seed(seed);
    numpy.random.choice(prompts, count, replace=replace)`` draws them (the paper's official
    ``generate_test_dataset_stp.py`` lines 152-153: 10,000 captions, seed 42, with replacement). Each drawn
    prompt, a repeated one included, gets its own prompt index, so file names and seeds stay deterministic."""
    if draw is None:
        return loaded
    import numpy as np

    count, seed, replace_ = draw.get("count"), draw.get("seed", 0), bool(draw.get("replace", True))
    if not isinstance(count, int) or count < 1 or (not replace_ and count > len(loaded.texts)):
        raise UserError(f"prompt_draw.count={count} must be an integer >= 1 (at most {len(loaded.texts)}, the "
                        "number of prompts, with prompt_draw.replace=false)")
    picks = np.random.RandomState(int(seed)).choice(len(loaded.texts), count, replace=replace_).tolist()
    return replace(loaded, texts=[loaded.texts[i] for i in picks], groups=[loaded.groups[i] for i in picks],
                   reference_keys=[loaded.reference_keys[i] for i in picks],
                   fields=[dict(loaded.fields[i]) for i in picks])


# ---------------------------------------------------------------------------------------------------------------
# Seeds


@dataclass(frozen=True)
class Seeds:
    """The seeds of a run's images. ``base``: ``seeds`` or ``0 .. images_per_prompt - 1``. ``scheme``:

    - ``shared``: every prompt's images have the seeds ``base``, so prompt i and prompt j start from the same
      noises;
    - ``per_prompt``: prompt i's image for base seed s has seed ``i * 1_000_000 + s``, so no two prompts share
      an initial noise. The seed is a function of (prompt index, s) alone: images never depend on the batch
      size or the shard, a folder resumes, and more images per prompt add seeds without changing the others.

    Each image's noise is drawn from its own seed (:func:`memguard.sampling.initial_noise`)."""

    base: tuple[int, ...]
    scheme: str = "shared"

    def __len__(self) -> int:
        """Images per prompt."""
        return len(self.base)

    def of(self, prompt_idx: int) -> list[int]:
        """The seeds of prompt ``prompt_idx``'s images, in order."""
        if self.scheme == "per_prompt":
            return [prompt_idx * SEED_STRIDE + s for s in self.base]
        return list(self.base)

    def pairs(self, n_prompts: int) -> list[tuple[int, int]]:
        """Every image of ``n_prompts`` prompts as ``(prompt_idx, seed)``, prompt by prompt."""
        return [(i, s) for i in range(n_prompts) for s in self.of(i)]

    def image_set(self, seed: int) -> list[int]:
        """The seeds of the prompt whose image has seed ``seed`` (all of ``base`` where seeds are shared)."""
        return self.of(seed // SEED_STRIDE) if self.scheme == "per_prompt" else list(self.base)


def load_seeds(cfg: DictConfig) -> Seeds:
    """``seeds`` if given, else ``0 .. images_per_prompt - 1``, under ``seed_scheme`` (:class:`Seeds`)."""
    scheme = cfg.get("seed_scheme") or "shared"
    if scheme not in SEED_SCHEMES:
        raise UserError(f"seed_scheme={scheme!r} is not one of shared (every prompt gets the same seeds), per_prompt "
                        f"(prompt i's image for seed s gets seed i * {SEED_STRIDE} + s)")
    if cfg.seeds is not None:
        seeds = [int(s) for s in ([cfg.seeds] if isinstance(cfg.seeds, int) else cfg.seeds)]
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise UserError(f"seeds={seeds} must be a non-empty list of distinct integers >= 0")
        if scheme == "per_prompt" and max(seeds) >= SEED_STRIDE:
            raise UserError(f"seeds={seeds} must be below {SEED_STRIDE} with seed_scheme=per_prompt (prompt i's image "
                            f"for seed s gets seed i * {SEED_STRIDE} + s)")
        return Seeds(tuple(seeds), scheme)
    if not isinstance(cfg.images_per_prompt, int) or cfg.images_per_prompt < 1:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt} must be an integer >= 1")
    if scheme == "per_prompt" and cfg.images_per_prompt > SEED_STRIDE:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt} must be at most {SEED_STRIDE} with "
                        "seed_scheme=per_prompt")
    return Seeds(tuple(range(cfg.images_per_prompt)), scheme)
