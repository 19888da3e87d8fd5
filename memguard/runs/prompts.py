"""A run's prompts from the config: the ``prompts`` list or ``prompts_file`` (read by
:mod:`memguard.runs.prompt_files`), then joined, relabelled, drawn and given their controls.

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

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from memguard.errors import UserError
from memguard.runs.prompt_files import (
    GROUP_COLUMN,
    RECORD_SUFFIXES,
    ROW_KEY,
    Columns,
    Prompts,
    file_key,
    read_prompts_file,
)


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
        warnings.append(f"{unmatched} of {len(loaded.texts)} prompt(s) of {file_key(path)} are not in prompt_join.file="
                        f"{str(file)!r} (column {on!r}): they keep no {', '.join(columns)}")
    names = {c for f in loaded.fields for c in f} | set(columns)
    for key, column in (("group_column", wanted.group), ("references_per_prompt", wanted.key)):
        if column is not None and column != ROW_KEY and column not in names:
            raise UserError(f"{key}={column}: neither {file_key(path)} nor prompt_join.columns has a column {column!r}; "
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
        else file_key(path)
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
    message = message.replace(file_key(path), f"{key}={str(path)!r}", 1)
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

    count, seed, replace_ = draw.get("count"), draw.get("seed", 0), bool(draw.get("replace", True))
    if not isinstance(count, int) or count < 1 or (not replace_ and count > len(loaded.texts)):
        raise UserError(f"prompt_draw.count={count} must be an integer >= 1 (at most {len(loaded.texts)}, the "
                        "number of prompts, with prompt_draw.replace=false)")
    picks = np.random.RandomState(int(seed)).choice(len(loaded.texts), count, replace=replace_).tolist()
    return replace(loaded, texts=[loaded.texts[i] for i in picks], groups=[loaded.groups[i] for i in picks],
                   reference_keys=[loaded.reference_keys[i] for i in picks],
                   fields=[dict(loaded.fields[i]) for i in picks])
