"""The run folder: one PNG per generation carrying its record, the resolved config, ``metrics.json``.

A folder only resumes under the same generation settings (:data:`GENERATION_KEYS`); images made for other
prompts are refused rather than mixed into.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin

from memguard.errors import UserError
from memguard.guidance import transition_step

log = logging.getLogger(__name__)
# Config sections that decide what an image looks like; a run folder only resumes under the same values.
GENERATION_KEYS = ("scenario", "model", "sampler", "mitigation", "guidance", "resolution", "dtype")
PNG_KEY = "memguard"


@dataclass
class Record:
    """One generation: which (prompt, seed), and its per-step trajectory."""

    prompt_idx: int
    prompt: str
    seed: int
    timesteps: list[float]
    d: list[float]
    scale: list[float]
    model_prompt: str | None = None  # what the model was given, where a prompt baseline changed the prompt
    baseline: dict[str, Any] | None = None  # what an embedding adjustment did (e.g. wen_iterations)
    norm_c: list[float] | None = None  # ||eps_c||_2 per step (None in folders made before it was recorded)
    norm_u: list[float] | None = None  # ||eps_u||_2 per step
    decision: str | None = None  # what a deciding schedule (mitigation=auto) chose for this image

    @property
    def file(self) -> str:
        return image_name(self.prompt_idx, self.seed)

    @property
    def transition_step(self) -> int | None:
        return transition_step(self.scale)


def image_name(prompt_idx: int, seed: int) -> str:
    return f"{prompt_idx:05d}_{seed}.png"


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    return {key: OmegaConf.to_container(cfg, resolve=True).get(key) for key in GENERATION_KEYS}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_folder(cfg: DictConfig, run_dir: Path) -> None:
    """Check that an existing run folder was made with the same generation settings as ``cfg``."""
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        old = {key: OmegaConf.to_container(OmegaConf.load(config_file), resolve=False).get(key) for key in GENERATION_KEYS}
        diffs = _differences(old, generation_settings(cfg))
        if diffs:
            raise UserError(
                f"run folder {run_dir} holds images made with other settings ({'; '.join(diffs)}); "
                "resume with the same settings, or choose another folder with run_name=NAME"
            )


def read_record(path: Path) -> Record | None:
    """The record stored in a memguard PNG, or None if the file has none (then it is not ours)."""
    with Image.open(path) as image:
        text = image.info.get(PNG_KEY)
    return Record(**json.loads(text)) if text else None


def write_image(path: Path, pixels: torch.Tensor, record: Record) -> None:
    """Save a ``(3, H, W)`` image in ``[0, 1]`` with its record, atomically (write, then rename)."""
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(vars(record)))
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def finished_record(path: Path) -> Record | None:
    """The record of a finished image: None where the file cannot be decoded (damaged, truncated) or carries
    no record, neither of which a finished image is (an image and its record are written in one rename)."""
    try:
        with Image.open(path) as image:
            image.load()
            text = image.info.get(PNG_KEY)
        return Record(**json.loads(text)) if text else None
    except (OSError, ValueError, SyntaxError, TypeError):  # PIL.UnidentifiedImageError is an OSError
        return None


def existing_records(run_dir: Path, prompts: list[str], seeds: list[int]) -> dict[tuple[int, int], Record]:
    """Records of the requested images already in the folder; refuses images made for another prompt. An
    image that cannot be read or has no record is left out, with a warning, so it is made again."""
    records = {}
    for idx, prompt in enumerate(prompts):
        for seed in seeds:
            path = run_dir / "images" / image_name(idx, seed)
            if not path.exists():
                continue
            record = finished_record(path)
            if record is None:
                log.warning("%s cannot be read or carries no memguard record (never a finished image): made again",
                            path)
                continue
            if record.prompt != prompt:
                found = f"prompt {record.prompt!r}"
                raise UserError(
                    f"{path} has {found}, not prompt {idx} {prompt!r}; the prompt list changed since this folder "
                    "was made: choose another folder with run_name=NAME"
                )
            records[(idx, seed)] = record
    return records


def update_metrics(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into ``metrics.json`` (other stages add their own keys) and return the whole."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update(values)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
