"""``run(cfg)``: generate every (prompt, seed) of a scenario under a mitigation into one run folder.

Folder layout (``cfg.run_dir``; :mod:`memguard.runs.folder` reads and writes it, :mod:`memguard.runs.outputs` its
tables and figures)::

    config.yaml          the resolved config
    images/{prompt_idx:05d}_{seed}.png
                         one PNG per generation (seed: the image's own, under seed_scheme; runs.seeds.Seeds);
                         its "memguard" text chunk holds the prompt, seed and the per-step trajectory, so an
                         image and its record are written in one atomic rename
    trajectories.csv     prompt_idx, seed, step, timestep, d, scale   (rebuilt from the PNGs)
    generations.csv      prompt_idx, prompt, seed, file, transition_step, transition_timestep
    metrics.json         the aggregate row: counts, transition statistics, timing
    grid.png, d_curves.png

Re-running the same command resumes: images already there are kept, the missing ones are made. A folder made
with other generation settings, or whose images carry other prompts, is refused rather than mixed into.
Several processes may fill one folder, each its shard of the pairs (:mod:`memguard.runs.shard`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig
from tqdm import tqdm

from memguard.check import require_inputs
from memguard.components import DTYPES, check_settings, load_scheduler, resolve_device
from memguard.errors import UserError, instantiate_checked
from memguard.evaluate import evaluate, planned_stages
from memguard.families import Family, family_class, load_family
from memguard.gpu import check_gpu_settings, prepare_model
from memguard.guidance import GuidanceSchedule
from memguard.metrics.bootstrap import intervals, with_intervals
from memguard.mitigations import SLOTS, Baselines
from memguard.mitigations.calibration import apply_calibration
from memguard.protocol import apply_protocol, resolve_sampler
from memguard.runs.folder import Record, check_folder, existing_records, folder_lock, update_metrics
from memguard.runs.outputs import (
    baseline_summary,
    transition_groups,
    transition_summary,
    write_figures,
    write_tables,
)
from memguard.runs.prompts import Prompts, load_prompts
from memguard.runs.seeds import load_seeds
from memguard.runs.shard import finishing, record_shard, shard_of, unfinished_result, write_config
from memguard.runs.writer import ImageWriter
from memguard.sampling import generate_images

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def build_schedule(cfg: DictConfig, num_train_timesteps: int) -> GuidanceSchedule:
    """Instantiate ``mitigation.schedule`` and check its timesteps against the scheduler's range."""
    schedule = instantiate_checked(cfg.mitigation.schedule, "mitigation.schedule")
    try:
        schedule.check_timesteps(num_train_timesteps)
    except ValueError as err:
        raise UserError(f"mitigation.schedule.{err} (mitigation={cfg.mitigation.name})") from err
    return schedule


def build_baselines(cfg: DictConfig, family: type[Family]) -> Baselines:
    """Instantiate the mitigation's slots (:data:`memguard.mitigations.SLOTS`) and refuse those the family lacks."""
    baselines = Baselines(**{key: instantiate_checked(cfg.mitigation[key], f"mitigation.{key}")
                             for key in SLOTS if cfg.mitigation.get(key) is not None})
    family.check_baselines(baselines, cfg.mitigation.name)
    return baselines


def build_scheduler(cfg: DictConfig, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """The sampler's diffusers scheduler, configured from the model's own scheduler config."""
    return instantiate_checked(cfg.sampler.scheduler, "sampler.scheduler", model_scheduler.config)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def generate(components: Family, scheduler: SchedulerMixin, schedule: GuidanceSchedule,
             todo: list[tuple[int, int]], prompts: list[str], steps: int, resolution: int | None, batch_size: int,
             image_dir: Path, progress: bool = True, baselines: Baselines | None = None,
             trajectory: str = "full") -> list[Record]:
    """Sample the (prompt_idx, seed) pairs in ``todo`` in batches and write one PNG each (in a background
    thread: :mod:`memguard.runs.writer`). ``components``: the model family's adapter (:mod:`memguard.families`).
    ``baselines`` may rewrite each image's prompt, its prompt embedding, or the UNet's cross-attention;
    ``trajectory``: see :func:`memguard.sampling.sample`."""
    baselines = baselines or Baselines()
    transform = baselines.prompt
    records = []
    with tqdm(total=len(todo), unit="img", desc="generating", disable=not progress) as bar, ImageWriter() as writer:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            batch_prompts = [prompts[idx] for idx, _ in batch]
            model_prompts = batch_prompts if transform is None else [
                transform(prompts[idx], seed, components.tokenizer) for idx, seed in batch]
            images, traj = generate_images(components, scheduler, schedule, model_prompts,
                                           [seed for _, seed in batch], steps, resolution, baselines, trajectory,
                                           batch_prompts)
            info = {k: v.cpu().tolist() for k, v in traj.info.items()}
            before = info.get("unet_evals_before", [0] * len(batch))  # a slot's search or optimisation
            d, scale = traj.d.cpu().tolist(), traj.scale.cpu().tolist()
            norm_c, norm_u = traj.norm_c.cpu().tolist(), traj.norm_u.cpu().tolist()
            decisions = schedule.decisions(traj.d)
            for i, (idx, seed) in enumerate(batch):
                record = Record(idx, batch_prompts[i], seed, traj.timesteps, d[i], scale[i],
                                None if transform is None else model_prompts[i],
                                {k: v[i] for k, v in info.items()} or None, norm_c[i], norm_u[i], decisions[i],
                                traj.unet_evals + int(before[i]))
                records.append(record)
            writer.submit(images, [image_dir / r.file for r in records[-len(batch):]], records[-len(batch):])
            bar.update(len(batch))
    return records


# ---------------------------------------------------------------------------------------------------------------
# The task


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (resuming) every requested image of ``cfg`` into ``cfg.run_dir``; return metrics."""
    # 1. Check every input that is cheap to check before the folder is touched
    check_settings(cfg)
    shard = shard_of(cfg)  # this process's share of the pairs (shard.index/count, accelerate's RANK/WORLD_SIZE)
    if cfg.get("dataset") is not None:  # a scenario whose data memguard generates (tiny) writes it first
        with folder_lock(Path(cfg.paths.output_dir), "dataset"):  # once, when shards start together
            instantiate_checked(cfg.dataset, "dataset")
    require_inputs(cfg)  # every input at once (memguard check), before anything is generated or written
    loaded, seeds = load_prompts(cfg), load_seeds(cfg)
    prompts = loaded.texts
    evaluating = cfg.evaluate and bool(planned_stages(cfg))
    device = shard.device(resolve_device(cfg.device))
    check_gpu_settings(cfg, device)
    family = family_class(cfg.model.path, cfg.model.get("family"))
    model_scheduler = load_scheduler(cfg.model.path)
    resolve_sampler(cfg, family)
    apply_protocol(cfg, model_scheduler.config.get("prediction_type") == "v_prediction")  # +protocol=authors
    scheduler = build_scheduler(cfg, model_scheduler)
    family.check_scheduler(scheduler)
    calibration = apply_calibration(cfg)  # a threshold calibrated on this model (memguard calibrate), else a warning
    schedule = build_schedule(cfg, scheduler.config.num_train_timesteps)
    baselines = build_baselines(cfg, family)
    for slot in (baselines.embedding, baselines.noise):  # a per-prompt embedding or latent search (SAIL's
        if hasattr(slot, "image_set"):                  # pool=prompt) is shared by all the prompt's seeds
            slot.image_set = seeds.image_set
    for slot in vars(baselines).values():  # a slot reading per-prompt inputs (a paraphrase file) checks them all now
        if hasattr(slot, "check_prompts"):
            slot.check_prompts(prompts)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    # 2. The run folder: same settings as before, or new
    run_dir = Path(cfg.run_dir)
    check_folder(cfg, run_dir)
    pairs = seeds.pairs(len(prompts))
    records = existing_records(run_dir, prompts, pairs, {p for p in pairs if shard.owns(*p)} if shard.sharded else None)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    if calibration is not None:
        (run_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    todo = [p for p in pairs if p not in records and shard.owns(*p)]
    log.info("run folder %s: %d of %d images present%s", run_dir, len(records), len(pairs),
             f" (of shard {shard.name}'s)" if shard.sharded else "")

    # 3. Load the model and sample what is missing
    started = time.perf_counter()
    if todo:
        components, batch_size = prepare_model(load_family(cfg.model.path, device, DTYPES[cfg.dtype],
                                                           cfg.model.get("family")), cfg, len(todo))
        for record in generate(components, scheduler, schedule, todo, prompts, cfg.sampler.steps, cfg.resolution,
                               batch_size, run_dir / "images", cfg.progress, baselines, cfg.trajectory):
            records[(record.prompt_idx, record.seed)] = record
    seconds = time.perf_counter() - started
    if shard.sharded:  # the other shards' images, as far as they are written
        record_shard(run_dir, shard, {"images_made": len(todo), "seconds": round(seconds, 3), "device": str(device)})
        records.update(existing_records(run_dir, prompts, pairs, {p for p in pairs if p not in records}))
        if len(records) < len(pairs):
            return unfinished_result(run_dir, shard, len(todo), len(pairs) - len(records), len(pairs))

    # 4. Tables, figures, metrics: by this process unless another is finishing the folder (memguard.runs.shard)
    with finishing(run_dir, shard, pairs) as go:
        return finish(cfg, run_dir, records, loaded, pairs, todo, seconds, evaluating) if go else \
            {"shard": shard.name, "images_made": len(todo), "n_images": len(pairs), "finished": False}


def mean_or_none(values: list[float]) -> float | None:
    """The mean of the values that are not NaN (``trajectory=off`` leaves steps unmeasured), or None."""
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def finish(cfg: DictConfig, run_dir: Path, records: dict[tuple[int, int], Record], loaded: Prompts,
           pairs: list[tuple[int, int]], todo: list[tuple[int, int]], seconds: float, evaluating: bool) -> dict[str, Any]:
    """Tables, figures and ``metrics.json`` of a folder with nothing missing (``pairs``: every image, prompt
    by prompt), then its evaluation."""
    prompts = loaded.texts
    ordered = [records[pair] for pair in pairs]
    write_tables(run_dir, ordered, loaded)
    write_figures(run_dir, ordered)
    metrics = update_metrics(run_dir, {
        "scenario": cfg.scenario.name,
        "mitigation": cfg.mitigation.name,
        "guidance_scale": cfg.guidance.scale,
        "steps": cfg.sampler.steps,
        "n_prompts": len(prompts),
        "n_images": len(ordered),
        "transition": {**transition_summary(ordered), **transition_groups(ordered, loaded.groups)},
        **baseline_summary(ordered),
        **with_intervals({"d_step0_mean": mean_or_none([r.d[0] for r in ordered])},
                         intervals([r.prompt_idx for r in ordered], {"d_step0_mean": ([r.d[0] for r in ordered], "mean")})),
        "unet_evals_per_image": mean_or_none([r.unet_evals for r in ordered if r.unet_evals is not None]),
        "unet_backward_per_image": mean_or_none([float((r.baseline or {}).get("unet_backward_before", 0))
                                                 for r in ordered]),
        "generation": {"images_made": len(todo), "seconds": round(seconds, 3),
                       "images_per_second": round(len(todo) / seconds, 4) if todo and seconds > 0 else None},
    })
    log.info("%d images in %s (%d made now, %.1f s)", len(ordered), run_dir, len(todo), seconds)
    # a step with nothing measured (trajectory=off leaves d and one branch's norm NaN, never both norms)
    if any(all(math.isnan(v) for v in step) for r in ordered for step in zip(r.d, r.norm_c or r.d, r.norm_u or r.d)):
        log.warning("d_t has NaN values: the model produced NaN predictions (try dtype=float32)")

    # Evaluation, unless told not to or metrics=none
    if evaluating:
        metrics = evaluate(cfg)
    return metrics
