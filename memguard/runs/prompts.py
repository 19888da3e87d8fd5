"""Prompts and seeds of a run: from the config, a text file or a JSONL file (with groups and reference keys)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from memguard.errors import UserError

PROMPT_FIELDS = ("prompt", "caption", "text")


@dataclass
class Prompts:
    """The prompts, and per prompt its group and its own references subfolder (None where not given)."""

    texts: list[str]
    groups: list[str | None]
    reference_keys: list[str | None]


def _read_prompts_file(path: Path, key_field: str | None) -> Prompts:
    """A ``.jsonl`` file (one object per line: ``prompt``, ``caption`` or ``text``, optional ``group`` and
    ``key_field``) or a text file (one prompt per line, blank lines skipped)."""
    if path.suffix != ".jsonl":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return Prompts(prompts, [None] * len(prompts), [None] * len(prompts))
    prompts, groups, keys = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(str(next(row[f] for f in PROMPT_FIELDS if f in row)))
        except (json.JSONDecodeError, StopIteration, TypeError) as err:
            raise UserError(f"prompts_file={str(path)!r} line {number} is not a JSON object with one of the fields "
                            f"{', '.join(PROMPT_FIELDS)}") from err
        if key_field is not None and row.get(key_field) is None:
            raise UserError(f"prompts_file={str(path)!r} line {number} has no field {key_field!r} "
                            f"(references_per_prompt={key_field})")
        groups.append(None if row.get("group") is None else str(row["group"]))
        keys.append(None if key_field is None else str(row[key_field]))
    return Prompts(prompts, groups, keys)


def load_prompts(cfg: DictConfig) -> Prompts:
    """The prompts from ``prompts`` or ``prompts_file``, with groups and reference keys from a JSONL file."""
    if cfg.prompts is not None and cfg.prompts_file is not None:
        raise UserError("both prompts and prompts_file are set (a scenario may set prompts); "
                        "give one of them, e.g. prompts=null prompts_file=FILE")
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompts_file={str(cfg.prompts_file)!r} is not a file; give a text file with one prompt "
                            "per line, or a .jsonl file with a prompt (and optional group) per line")
        loaded = _read_prompts_file(path, cfg.references_per_prompt)
    else:
        if cfg.references_per_prompt is not None:
            raise UserError(f"references_per_prompt={cfg.references_per_prompt} needs a .jsonl prompts_file")
        texts = [cfg.prompts] if isinstance(cfg.prompts, str) else [str(p) for p in (cfg.prompts or [])]
        loaded = Prompts(texts, [None] * len(texts), [None] * len(texts))
    if not loaded.texts:
        raise UserError("no prompts: give prompts='[a photo of ..., ...]' or prompts_file=FILE (one prompt per line)")
    return draw_prompts(loaded, cfg.get("prompt_draw"))


def draw_prompts(loaded: Prompts, draw: DictConfig | None) -> Prompts:
    """``prompt_draw`` ({count, seed, replace}): ``count`` prompts drawn as ``numpy.random.seed(seed);
    numpy.random.choice(prompts, count, replace=replace)`` draws them (the paper's official
    ``generate_test_dataset_stp.py`` lines 152-153: 10,000 captions, seed 42, with replacement). Each drawn
    prompt, a repeated one included, gets its own prompt index, so file names and seeds stay deterministic."""
    if draw is None:
        return loaded
    import numpy as np

    count, seed, replace = draw.get("count"), draw.get("seed", 0), bool(draw.get("replace", True))
    if not isinstance(count, int) or count < 1 or (not replace and count > len(loaded.texts)):
        raise UserError(f"prompt_draw.count={count} must be an integer >= 1 (at most {len(loaded.texts)}, the "
                        "number of prompts, with prompt_draw.replace=false)")
    picks = np.random.RandomState(int(seed)).choice(len(loaded.texts), count, replace=replace).tolist()
    return Prompts([loaded.texts[i] for i in picks], [loaded.groups[i] for i in picks],
                   [loaded.reference_keys[i] for i in picks])


def load_seeds(cfg: DictConfig) -> list[int]:
    """``seeds`` if given, else ``0 .. images_per_prompt - 1``."""
    if cfg.seeds is not None:
        seeds = [int(s) for s in ([cfg.seeds] if isinstance(cfg.seeds, int) else cfg.seeds)]
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise UserError(f"seeds={seeds} must be a non-empty list of distinct integers >= 0")
        return seeds
    if not isinstance(cfg.images_per_prompt, int) or cfg.images_per_prompt < 1:
        raise UserError(f"images_per_prompt={cfg.images_per_prompt} must be an integer >= 1")
    return list(range(cfg.images_per_prompt))
