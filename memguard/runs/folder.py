"""The run folder: one PNG per generation carrying its record, the resolved config, ``metrics.json``.

A folder only resumes under the same generation settings (:data:`GENERATION_KEYS`); images made for other
prompts are refused rather than mixed into.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
# (Not ``shard``: shards are by pair, so a folder may be finished with another shard count.)
GENERATION_KEYS = ("scenario", "model", "sampler", "mitigation", "guidance", "resolution", "dtype", "vae_dtype",
                   "seed_scheme")
# What a folder written before a key existed was made with: the key's default then (a dotted key: where its
# parent node is there, e.g. a prompt baseline's draw).
FORMER_DEFAULTS = {"seed_scheme": "shared", "mitigation.prompt.per": "image"}
# Classes that moved: the ``_target_`` a folder's saved config names -> where the class lives now, so a folder
# written before the move resumes (the random-token, Wen and Ren baselines left ``memguard/baselines.py``).
FORMER_TARGETS = {
    "memguard.baselines.RandomTokens": "memguard.mitigations.random_tokens.RandomTokens",
    "memguard.baselines.WenEmbeddingOptimization": "memguard.mitigations.wen.WenEmbeddingOptimization",
    "memguard.baselines.WenSharedEmbedding": "memguard.mitigations.wen.WenSharedEmbedding",
    "memguard.baselines.RenAttention": "memguard.mitigations.ren.RenAttention",
}
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
    unet_evals: int | None = None  # UNet evaluations of the sampling loop for this image (one per branch and step)

    @property
    def file(self) -> str:
        return image_name(self.prompt_idx, self.seed)

    @property
    def transition_step(self) -> int | None:
        return transition_step(self.scale)


def image_name(prompt_idx: int, seed: int) -> str:
    return f"{prompt_idx:05d}_{seed}.png"


# Keys of the generation settings that describe a method without changing what it generates (how `memguard
# compare` sweeps it, where its calibration is kept): left out of the settings a folder resumes under
DESCRIPTIVE_KEYS = ("sweep", "calibration", "prepare")


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return without_descriptive({key: resolved.get(key, FORMER_DEFAULTS.get(key)) for key in GENERATION_KEYS})


def without_descriptive(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without the mitigation's :data:`DESCRIPTIVE_KEYS`."""
    if isinstance(settings.get("mitigation"), dict):
        settings["mitigation"] = {k: v for k, v in settings["mitigation"].items() if k not in DESCRIPTIVE_KEYS}
    return settings


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two nested dicts, each as "key: old -> new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def with_former_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each dotted :data:`FORMER_DEFAULTS` key filled in where its parent node exists."""
    for dotted, value in FORMER_DEFAULTS.items():
        *parents, leaf = dotted.split(".")
        node = settings
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if parents and isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return settings


def with_current_targets(node: Any) -> Any:
    """A saved config tree with every ``_target_`` that names a moved class (:data:`FORMER_TARGETS`) renamed."""
    if isinstance(node, dict):
        return {k: FORMER_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else with_current_targets(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [with_current_targets(v) for v in node]
    return node


def saved_config(config_file: Path) -> dict[str, Any]:
    """A run folder's saved ``config.yaml`` (unresolved), with moved classes under their current names."""
    return with_current_targets(OmegaConf.to_container(OmegaConf.load(config_file), resolve=False))


def check_folder(cfg: DictConfig, run_dir: Path) -> None:
    """Check that an existing run folder was made with the same generation settings as ``cfg``."""
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        saved = saved_config(config_file)
        old = without_descriptive(with_former_defaults({key: saved.get(key, FORMER_DEFAULTS.get(key))
                                                           for key in GENERATION_KEYS}))
        diffs = differences(old, generation_settings(cfg))
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


def existing_records(run_dir: Path, prompts: list[str], pairs: list[tuple[int, int]],
                     only: set[tuple[int, int]] | None = None) -> dict[tuple[int, int], Record]:
    """Records of the requested images (``pairs``: ``(prompt_idx, seed)``, :meth:`Seeds.pairs
    <memguard.runs.seeds.Seeds.pairs>`) already in the folder; refuses images made for another prompt. An
    image that cannot be read or has no record is left out, with a warning, so it is made again. ``only``
    reads only those pairs (a shard's own, or the ones other shards were making)."""
    records = {}
    for idx, seed in pairs:
        if only is not None and (idx, seed) not in only:
            continue
        path = run_dir / "images" / image_name(idx, seed)
        if not path.exists():
            continue
        record = finished_record(path)
        if record is None:
            log.warning("%s cannot be read or carries no memguard record (never a finished image): made again", path)
            continue
        if record.prompt != prompts[idx]:
            raise UserError(
                f"{path} has prompt {record.prompt!r}, not prompt {idx} {prompts[idx]!r}; the prompt list changed "
                "since this folder was made: choose another folder with run_name=NAME"
            )
        records[(idx, seed)] = record
    return records


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a file of this process's own, renamed over ``path``: a reader (or
    another process writing the same file) sees the old or the new content, never a mix."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (unique to this process) to write; renamed over ``path`` on success."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder_lock(run_dir: Path, name: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``run_dir/.<name>.lock`` held for the block; yields whether it was taken (always
    True when ``blocking``). Processes writing one run folder (shards) serialise their read-modify-writes on it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / f".{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as err:  # a file system without locks (ENOLCK, EOPNOTSUPP): go on, as memguard did before
            log.warning("cannot lock %s (%s); processes sharing this folder are not serialised", handle.name, err)
            yield True
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_metrics(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into ``metrics.json`` (other stages add their own keys) and return the whole. Processes
    sharing the folder take turns (a lock) and each write is atomic."""
    path = run_dir / "metrics.json"
    with folder_lock(run_dir, "metrics"):
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics.update(values)
        atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return metrics
