"""``run(cfg)``: generate every (prompt, seed) of a scenario under a mitigation into one run folder.

Folder layout (``cfg.run_dir``)::

    config.yaml          the resolved config
    images/{prompt_idx:05d}_{seed}.png
                         one PNG per generation; its "memguard" text chunk holds the prompt, seed and the
                         per-step trajectory, so an image and its record are written in one atomic rename
    trajectories.csv     prompt_idx, seed, step, timestep, d, scale   (rebuilt from the PNGs)
    generations.csv      prompt_idx, prompt, seed, file, transition_step, transition_timestep
    metrics.json         the aggregate row: counts, transition statistics, timing
    grid.png, d_curves.png

Re-running the same command resumes: images already there are kept, the missing ones are made. A folder made
with other generation settings, or whose images carry other prompts, is refused rather than mixed into.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, PngImagePlugin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm import tqdm

from memguard.baselines import Baselines
from memguard.components import FOLDER_HELP, Components, load_components, load_scheduler, resolve_device
from memguard.errors import UserError, instantiate_checked
from memguard.guidance import GuidanceSchedule, transition_step
from memguard.sampling import generate_images

log = logging.getLogger(__name__)

# Config sections that decide what an image looks like; a run folder only resumes under the same values.
GENERATION_KEYS = ("scenario", "model", "sampler", "mitigation", "guidance", "resolution", "dtype")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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

    @property
    def file(self) -> str:
        return image_name(self.prompt_idx, self.seed)

    @property
    def transition_step(self) -> int | None:
        return transition_step(self.scale)


def image_name(prompt_idx: int, seed: int) -> str:
    return f"{prompt_idx:05d}_{seed}.png"


# ---------------------------------------------------------------------------------------------------------------
# Inputs


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
    return loaded


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


def check_settings(cfg: DictConfig) -> None:
    """Reject bad top-level values, naming the key."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise UserError(f"model.path is not set; give model.path=DIR, where {FOLDER_HELP}")
    for key in ("guidance.scale", "guidance.og_scale"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or not value >= 0:
            raise UserError(f"{key}={value} must be a number >= 0 (opposite guidance is set by its strength, not a sign)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be an integer >= 1")
    if not isinstance(cfg.sampler.steps, int) or cfg.sampler.steps < 1:
        raise UserError(f"sampler.steps={cfg.sampler.steps} must be an integer >= 1")


def build_schedule(cfg: DictConfig, num_train_timesteps: int) -> GuidanceSchedule:
    """Instantiate ``mitigation.schedule`` and check its timesteps against the scheduler's range."""
    schedule = instantiate_checked(cfg.mitigation.schedule, "mitigation.schedule")
    try:
        schedule.check_timesteps(num_train_timesteps)
    except ValueError as err:
        raise UserError(f"mitigation.schedule.{err} (mitigation={cfg.mitigation.name})") from err
    return schedule


def build_scheduler(cfg: DictConfig, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The sampler's diffusers scheduler, configured from the model's own scheduler config."""
    return instantiate_checked(cfg.sampler.scheduler, "sampler.scheduler", model_scheduler.config)


# ---------------------------------------------------------------------------------------------------------------
# The run folder


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


def existing_records(run_dir: Path, prompts: list[str], seeds: list[int]) -> dict[tuple[int, int], Record]:
    """Records of the requested images already in the folder; refuses images made for another prompt."""
    records = {}
    for idx, prompt in enumerate(prompts):
        for seed in seeds:
            path = run_dir / "images" / image_name(idx, seed)
            if not path.exists():
                continue
            record = read_record(path)
            if record is None or record.prompt != prompt:
                found = "no memguard record" if record is None else f"prompt {record.prompt!r}"
                raise UserError(
                    f"{path} has {found}, not prompt {idx} {prompt!r}; the prompt list changed since this folder "
                    "was made: choose another folder with run_name=NAME"
                )
            records[(idx, seed)] = record
    return records


# ---------------------------------------------------------------------------------------------------------------
# Generation


def generate(components: Components, scheduler: SchedulerMixin, schedule: GuidanceSchedule,
             todo: list[tuple[int, int]], prompts: list[str], steps: int, resolution: int | None, batch_size: int,
             image_dir: Path, progress: bool = True, baselines: Baselines | None = None) -> list[Record]:
    """Sample the (prompt_idx, seed) pairs in ``todo`` in batches and write one PNG each. ``baselines`` may
    rewrite each image's prompt, its prompt embedding, or the UNet's cross-attention."""
    baselines = baselines or Baselines()
    transform = baselines.prompt
    records = []
    with tqdm(total=len(todo), unit="img", desc="generating", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_prompts = [prompts[idx] for idx, _ in batch]
            model_prompts = batch_prompts if transform is None else [
                transform(prompts[idx], seed, components.tokenizer) for idx, seed in batch]
            images, traj = generate_images(components, scheduler, schedule, model_prompts,
                                           [seed for _, seed in batch], steps, resolution, baselines.embedding,
                                           baselines.attention)
            info = {k: v.cpu().tolist() for k, v in traj.info.items()}
            d, scale = traj.d.cpu().tolist(), traj.scale.cpu().tolist()
            for i, (idx, seed) in enumerate(batch):
                record = Record(idx, batch_prompts[i], seed, traj.timesteps, d[i], scale[i],
                                None if transform is None else model_prompts[i],
                                {k: v[i] for k, v in info.items()} or None)
                write_image(image_dir / record.file, images[i], record)
                records.append(record)
            bar.update(len(batch))
    return records


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def transition_summary(records: list[Record]) -> dict[str, Any]:
    """How often, and at which step, positive guidance began: a schedule that never engages shows here."""
    steps = [r.transition_step for r in records]
    fired = sorted(s for s in steps if s is not None)
    histogram: dict[str, int] = {}
    for s in fired:
        histogram[str(s)] = histogram.get(str(s), 0) + 1
    return {
        "fired_fraction": len(fired) / len(records),
        "never_fired_fraction": 1 - len(fired) / len(records),
        "step_mean": sum(fired) / len(fired) if fired else None,
        "step_median": fired[len(fired) // 2] if fired else None,
        "step_histogram": histogram,
    }


def baseline_summary(records: list[Record]) -> dict[str, Any]:
    """Means of what an embedding baseline reported per image (iterations, norms, fraction that reached the
    target), so a baseline that stops at its iteration cap shows in metrics.json."""
    infos = [r.baseline for r in records if r.baseline]
    if not infos:
        return {}
    return {"embedding_baseline": {k: sum(float(i[k]) for i in infos) / len(infos) for k in infos[0]}}


def write_tables(run_dir: Path, records: list[Record], prompts: Prompts) -> None:
    import pandas as pd

    pd.DataFrame([
        {"prompt_idx": r.prompt_idx, "seed": r.seed, "step": k, "timestep": t, "d": d, "scale": s}
        for r in records for k, (t, d, s) in enumerate(zip(r.timesteps, r.d, r.scale))
    ]).to_csv(run_dir / "trajectories.csv", index=False)
    pd.DataFrame([
        {"prompt_idx": r.prompt_idx, "prompt": r.prompt, "group": prompts.groups[r.prompt_idx],
         "reference_key": prompts.reference_keys[r.prompt_idx], "seed": r.seed, "file": f"images/{r.file}",
         "model_prompt": r.model_prompt, **(r.baseline or {}),
         "transition_step": r.transition_step,
         "transition_timestep": None if r.transition_step is None else r.timesteps[r.transition_step]}
        for r in records
    ]).astype({"transition_step": "Int64"}).to_csv(run_dir / "generations.csv", index=False)


def write_figures(run_dir: Path, records: list[Record], seeds: list[int], max_rows: int = 8, max_cols: int = 8) -> None:
    """``grid.png`` (rows: prompts, columns: seeds) and ``d_curves.png`` (d_t and s per step, every image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r.prompt_idx, r.seed): r for r in records}
    rows = sorted({r.prompt_idx for r in records})[:max_rows]
    cols = seeds[:max_cols]
    tiles = [[Image.open(run_dir / "images" / image_name(i, s)).convert("RGB") for s in cols if (i, s) in by_key]
             for i in rows]
    side = max(64, max(t.width for row in tiles for t in row))
    grid = Image.new("RGB", (side * len(cols), side * len(rows)), "white")
    for y, row in enumerate(tiles):
        for x, tile in enumerate(row):
            grid.paste(tile.resize((side, side), Image.NEAREST), (x * side, y * side))
    grid.save(run_dir / "grid.png")

    fig, (ax_d, ax_s) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    for r in records:
        ax_d.plot(r.d, color=f"C{r.prompt_idx % 10}", alpha=0.4, lw=0.8)
        ax_s.plot(r.scale, color=f"C{r.prompt_idx % 10}", alpha=0.4, lw=0.8)
        if r.transition_step is not None:
            ax_d.plot(r.transition_step, r.d[r.transition_step], "k|", ms=8)
    ax_d.set_yscale("log")
    ax_d.set_ylabel(r"$d_t = \|\epsilon_c - \epsilon_u\|^2$")
    ax_d.set_title(f"{len(records)} generations (colour: prompt; |: transition step)")
    ax_s.set_ylabel("scale s")
    ax_s.set_xlabel("sampling step")
    fig.tight_layout()
    fig.savefig(run_dir / "d_curves.png", dpi=100)
    plt.close(fig)


def update_metrics(run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge ``values`` into ``metrics.json`` (other stages add their own keys) and return the whole."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics.update(values)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# The task


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (resuming) every requested image of ``cfg`` into ``cfg.run_dir``; return metrics."""
    from memguard.evaluate import evaluate, planned_stages  # evaluate imports this module
    # 1. Check every input that is cheap to check before the folder is touched
    check_settings(cfg)
    if cfg.get("dataset") is not None:  # a scenario whose data memguard generates (tiny) writes it first
        instantiate_checked(cfg.dataset, "dataset")
    loaded, seeds = load_prompts(cfg), load_seeds(cfg)
    prompts = loaded.texts
    evaluating = cfg.evaluate and bool(planned_stages(cfg))
    device = resolve_device(cfg.device)
    scheduler = build_scheduler(cfg, load_scheduler(cfg.model.path))
    schedule = build_schedule(cfg, scheduler.config.num_train_timesteps)
    baselines = Baselines(**{key: instantiate_checked(cfg.mitigation[key], f"mitigation.{key}")
                             for key in ("prompt", "embedding", "attention") if cfg.mitigation.get(key) is not None})
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    # 2. The run folder: same settings as before, or new
    run_dir = Path(cfg.run_dir)
    check_folder(cfg, run_dir)
    records = existing_records(run_dir, prompts, seeds)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    todo = [(i, s) for i in range(len(prompts)) for s in seeds if (i, s) not in records]
    log.info("run folder %s: %d of %d images present", run_dir, len(records), len(prompts) * len(seeds))

    # 3. Load the model and sample what is missing
    started = time.perf_counter()
    if todo:
        components = load_components(cfg.model.path, device, DTYPES[cfg.dtype])
        for record in generate(components, scheduler, schedule, todo, prompts, cfg.sampler.steps, cfg.resolution,
                               cfg.batch_size, run_dir / "images", cfg.progress, baselines):
            records[(record.prompt_idx, record.seed)] = record
    seconds = time.perf_counter() - started

    # 4. Tables, figures, metrics
    ordered = [records[(i, s)] for i in range(len(prompts)) for s in seeds]
    write_tables(run_dir, ordered, loaded)
    write_figures(run_dir, ordered, seeds)
    metrics = update_metrics(run_dir, {
        "scenario": cfg.scenario.name,
        "mitigation": cfg.mitigation.name,
        "guidance_scale": cfg.guidance.scale,
        "steps": cfg.sampler.steps,
        "n_prompts": len(prompts),
        "n_images": len(ordered),
        "transition": transition_summary(ordered),
        **baseline_summary(ordered),
        "d_step0_mean": sum(r.d[0] for r in ordered) / len(ordered),
        "generation": {"images_made": len(todo), "seconds": round(seconds, 3),
                       "images_per_second": round(len(todo) / seconds, 4) if todo and seconds > 0 else None},
    })
    log.info("%d images in %s (%d made now, %.1f s)", len(ordered), run_dir, len(todo), seconds)
    if any(math.isnan(v) for r in ordered for v in r.d):
        log.warning("d_t has NaN values: the model produced NaN predictions (try dtype=float32)")

    # 5. Evaluation, unless told not to or metrics=none
    if evaluating:
        metrics = evaluate(cfg)
    return metrics
