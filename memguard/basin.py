"""The attraction basin, measured (Jain et al., Fig. 2, 4, 13): CFG started at each of a list of steps.

For each (prompt, seed) one trajectory runs without CFG (``s = -opposite``: zero guidance, or opposite guidance
for OG) and records ``d_t``; at each start step ``k`` a branch continues from that trajectory's latents and a
copy of the scheduler as it was at step ``k``, with ``s = lambda`` from ``k`` on. The prefix is shared, never
recomputed: the cost is one trajectory plus the branches' remaining steps, against ``len(starts)`` full runs.
A branch equals an independent run of ``StaticTransition(tau=t_k)`` (tests/test_sampling.py).

DTP's switch step (:func:`memguard.guidance.dtp_switch_step`) depends only on the prefix's ``d`` (it is decided
before any CFG is applied), so DTP's image is exactly the branch started at its switch step; its ``d`` after
the switch differs from the prefix's, which no longer matters to the schedule.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor

from memguard.components import DTYPES, check_settings, load_scheduler, resolve_device
from memguard.errors import UserError, instantiate_checked
from memguard.evaluate import STAGES, planned_stages, reference_files
from memguard.families import Conditions, Family, family_class, load_family
from memguard.guidance import GuidanceSchedule, dtp_switch_step
from memguard.protocol import resolve_sampler
from memguard.runner import build_scheduler
from memguard.runs.folder import (
    FORMER_DEFAULTS,
    Record,
    differences,
    read_record,
    saved_config,
    update_metrics,
    write_image,
)
from memguard.runs.prompts import load_prompts
from memguard.runs.seeds import load_seeds
from memguard.sampling import Trajectory, decode, prepare_batch, sample


class CfgFrom(GuidanceSchedule):
    """CFG from a sampling step: ``s = -opposite`` for steps ``k < start``, ``s = scale`` for ``k >= start``.

    The step-indexed twin of :class:`~memguard.guidance.StaticTransition`; ``start >= steps`` never applies CFG
    (the basin's shared prefix). Ranges: ``scale >= 0``, ``opposite >= 0``.
    """

    def __init__(self, start: int, scale: float, opposite: float = 0.0) -> None:
        if not (scale >= 0 and opposite >= 0):
            raise ValueError(f"scale={scale}, opposite={opposite} must be >= 0")
        self.start, self.scale, self.opposite = int(start), float(scale), float(opposite)

    def __call__(self, step: int, timestep: float, d: Tensor) -> Tensor:
        return self._full(d, self.scale if step >= self.start else -self.opposite)


@dataclass
class Branches:
    """One batch's shared prefix and its branches (start step -> trajectory), and the UNet evaluations spent
    (per image: one batched call on ``[x, x]`` per step)."""

    prefix: Trajectory
    branches: dict[int, Trajectory]
    evaluations: int


def check_starts(starts: Sequence[int], steps: int) -> list[int]:
    """``basin.starts`` must be strictly increasing steps in ``[0, steps - 1]``."""
    starts = [int(k) for k in starts]
    if not starts or any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < 0 or starts[-1] >= steps:
        raise UserError(f"basin.starts={starts} must be a non-empty, strictly increasing list of steps in "
                        f"[0, {steps - 1}] (sampler.steps={steps}); e.g. basin.starts='[0,5,10]'")
    return starts


@torch.no_grad()
def branch(model: Family | torch.nn.Module, scheduler: SchedulerMixin, cond: Conditions | Tensor,
           uncond: Conditions | Tensor, noise: Tensor, starts: Sequence[int], steps: int, scale: float,
           opposite: float = 0.0) -> Branches:
    """The prefix (``s = -opposite`` throughout) and, for every start ``k``, CFG ``scale`` from step ``k``,
    continued from the prefix's latents and scheduler state at ``k``. ``model``, ``cond``, ``uncond``: as for
    :func:`~memguard.sampling.sample` (a family adapter and its conditions)."""
    wanted, kept, calls = set(starts), {}, [0]

    def snapshot(state: dict) -> None:
        calls[0] += 1
        if state["step"] in wanted:
            kept[state["step"]] = (state["x"].clone(), copy.deepcopy(scheduler))

    prefix = sample(model, scheduler, cond, uncond, noise, CfgFrom(steps, scale, opposite), steps, callback=snapshot)
    branches = {}
    for k in starts:
        x, state = kept[k]

        def count(_: dict) -> None:
            calls[0] += 1

        branches[k] = sample(model, state, cond, uncond, x, CfgFrom(k, scale, opposite), steps, callback=count,
                             start=k, prefix=prefix)
    return Branches(prefix, branches, calls[0] * noise.shape[0])


def empirical_transition(starts: Sequence[int], copies: Sequence[bool]) -> int | None:
    """The first start from which this and every later start gives no copy; None if the last start copies
    (in particular if all do); ``starts[0]`` (0 by default) if none does."""
    first = None
    for k, copied in zip(starts, copies):
        if copied:
            first = None
        elif first is None:
            first = k
    return first


# ---------------------------------------------------------------------------------------------------------------
# The task: `memguard basin`

FOLDER_KEYS = ("scenario", "model", "sampler", "guidance", "resolution", "dtype", "seed_scheme")


def branch_name(prompt_idx: int, seed: int, start: int | None) -> str:
    """``images/{prompt_idx:05d}_{seed}_k{start:03d}.png``; ``start=None``: the prefix's own image (no CFG)."""
    return f"{prompt_idx:05d}_{seed}_{'never' if start is None else f'k{start:03d}'}.png"


def default_starts(steps: int) -> list[int]:
    """Every 5th step: 0, 5, ..., below ``steps``."""
    return list(range(0, steps, 5))


def _check_basin_folder(cfg, run_dir) -> None:
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        return
    old = saved_config(config_file)
    new = OmegaConf.to_container(cfg, resolve=True)
    diffs = differences({k: old.get(k, FORMER_DEFAULTS.get(k)) for k in FOLDER_KEYS}
                        | {"basin.opposite": old.get("basin", {}).get("opposite")},
                        {k: new.get(k, FORMER_DEFAULTS.get(k)) for k in FOLDER_KEYS}
                        | {"basin.opposite": new["basin"]["opposite"]})
    if diffs:
        raise UserError(f"basin folder {run_dir} holds images made with other settings ({'; '.join(diffs)}); resume "
                        "with the same settings, or choose another folder with basin.name=NAME")


def basin(cfg) -> dict:
    """Generate (resuming) every branch of every (prompt, seed) into the basin folder, evaluate, summarise."""
    log = logging.getLogger(__name__)
    # 1. Inputs
    check_settings(cfg)
    if cfg.mitigation.name != "none" or any(cfg.mitigation.get(k) is not None for k in ("prompt", "embedding", "attention")):
        raise UserError(f"mitigation={cfg.mitigation.name} does not apply to memguard basin, which sets its own "
                        "schedules (basin.starts, basin.opposite); leave mitigation out")
    steps = cfg.sampler.steps
    starts = check_starts(default_starts(steps) if cfg.basin.starts is None else list(cfg.basin.starts), steps)
    opposite, scale = float(cfg.basin.opposite), float(cfg.guidance.scale)
    if not opposite >= 0:
        raise UserError(f"basin.opposite={opposite} must be >= 0 (the strength of opposite guidance before the start)")
    if cfg.metrics.get("similarity") is None:
        raise UserError(f"memguard basin decides copies by metrics.similarity; metrics={cfg.metrics.name} sets none: "
                        "choose metrics=tiny, pixel, sscd or paper")
    if cfg.get("dataset") is not None:
        instantiate_checked(cfg.dataset, "dataset")
    loaded, seeds = load_prompts(cfg), load_seeds(cfg)
    prompts = loaded.texts
    planned_stages(cfg)
    device = resolve_device(cfg.device)
    family = family_class(cfg.model.path, cfg.model.get("family"))
    resolve_sampler(cfg, family)
    template = build_scheduler(cfg, load_scheduler(cfg.model.path))
    family.check_scheduler(template)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))

    # 2. The folder: same settings, or new; what is already there
    run_dir = Path(cfg.run_dir)
    _check_basin_folder(cfg, run_dir)
    image_dir = run_dir / "images"
    wanted = [None, *starts]
    records: dict[tuple[int, int, int | None], Record] = {}
    pairs = seeds.pairs(len(prompts))
    for idx, seed in pairs:
        for k in wanted:
            path = image_dir / branch_name(idx, seed, k)
            if path.exists():
                record = read_record(path)
                if record is None or record.prompt != prompts[idx]:
                    raise UserError(f"{path} was made for another prompt; the prompt list changed since this "
                                    "folder was made: choose another folder with basin.name=NAME")
                records[(idx, seed, k)] = record
    image_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True)))
    todo = [(i, s) for i, s in pairs if any((i, s, k) not in records for k in wanted)]

    # 3. One shared prefix per image, its branches; only missing files are written
    started, evaluations = time.perf_counter(), 0
    if todo:
        model = load_family(cfg.model.path, device, DTYPES[cfg.dtype], cfg.model.get("family"))
        for first in range(0, len(todo), cfg.batch_size):
            batch = todo[first : first + cfg.batch_size]
            cond, uncond, noise = prepare_batch(model, [prompts[i] for i, _ in batch], [s for _, s in batch],
                                                cfg.resolution)
            result = branch(model, copy.deepcopy(template), cond, uncond, noise, starts, steps, scale, opposite)
            evaluations += result.evaluations
            for k, traj in [(None, result.prefix), *result.branches.items()]:
                images = decode(model, traj.latents)
                d, s = traj.d.cpu().tolist(), traj.scale.cpu().tolist()
                for j, (idx, seed) in enumerate(batch):
                    if (idx, seed, k) not in records:
                        record = Record(idx, prompts[idx], seed, traj.timesteps, d[j], s[j])
                        write_image(image_dir / branch_name(idx, seed, k), images[j], record)
                        records[(idx, seed, k)] = record
            log.info("basin: %d of %d images", first + len(batch), len(todo))
    seconds = time.perf_counter() - started

    # 4. Evaluate every branch with the scenario's metrics; copies; transitions

    rows = []
    for idx, seed in pairs:
        prefix = records[(idx, seed, None)]
        for k in starts:
            rows.append({"prompt_idx": idx, "prompt": prompts[idx], "group": loaded.groups[idx],
                         "reference_key": loaded.reference_keys[idx], "seed": seed, "start": k,
                         "timestep": prefix.timesteps[k], "d": prefix.d[k],
                         "file": f"images/{branch_name(idx, seed, k)}"})
    frame = pd.DataFrame(rows)
    references = reference_files(cfg.references)
    stage_results = {}
    for name in ("similarity", "alignment"):
        if cfg.metrics.get(name) is not None:
            stage_results.update(STAGES[name][0](cfg, run_dir, frame, references))
    threshold = cfg.metrics.copy_threshold if cfg.metrics.copy_threshold is not None else cfg.metrics.threshold
    frame["copy"] = frame.similarity > threshold
    frame.to_csv(run_dir / "basin.csv", index=False)
    transitions = transition_table(frame, records, starts, steps, float(cfg.basin.tau))
    transitions.to_csv(run_dir / "transitions.csv", index=False)
    n_images = len(pairs)
    per_image = steps + sum(steps - k for k in starts)
    metrics = update_metrics(run_dir, {
        "task": "basin", "scenario": cfg.scenario.name, "guidance_scale": scale, "opposite": opposite,
        "steps": steps, "starts": starts, "tau": float(cfg.basin.tau), "n_prompts": len(prompts),
        "n_images": n_images, "n_branches": len(frame),
        "copy_rule": {"embedder": stage_results["similarity"]["embedder"], "threshold": float(threshold)},
        "branches": stage_results,
        "transitions": transition_summary(transitions, starts, steps),
        "unet_evaluations": {"per_image_shared": per_image, "per_image_independent": len(starts) * steps,
                             "ratio": per_image / (len(starts) * steps), "measured_now": evaluations,
                             "images_made_now": len(todo)},
        "generation": {"seconds": round(seconds, 3)},
    })
    write_strips(run_dir, frame, transitions, records, starts, steps)
    log.info("basin: %d images x %d starts in %s (%.1f s)", n_images, len(starts), run_dir, seconds)
    return metrics


def transition_table(frame, records, starts: list[int], steps: int, tau: float):
    """One row per (prompt, seed): the empirical transition step beside DTP's and STP's switch steps."""

    rows = []
    for (idx, seed), branches in frame.groupby(["prompt_idx", "seed"], sort=False):
        branches = branches.sort_values("start")
        prefix = records[(idx, seed, None)]
        empirical = empirical_transition(starts, branches["copy"].tolist())
        dtp = dtp_switch_step(prefix.d)
        stp = next((k for k, t in enumerate(prefix.timesteps) if t <= tau), None)
        i = starts.index(empirical) if empirical is not None else None
        low = starts[max(i - 1, 0)] if i is not None else None
        high = starts[i + 1] if i is not None and i + 1 < len(starts) else steps - 1
        safe = dtp is None or (empirical is not None and dtp >= empirical)
        within = empirical is not None and dtp is not None and low <= dtp <= high
        agreement = ("never" if dtp is None else "no_exit" if empirical is None else
                     "early" if dtp < empirical else "match" if within else "late")
        align = branches.set_index("start").get("alignment")
        rows.append({"prompt_idx": idx, "prompt": branches.prompt.iloc[0], "group": branches.group.iloc[0],
                     "seed": seed, "empirical_step": empirical, "dtp_step": dtp, "stp_step": stp,
                     "agreement": agreement, "dtp_safe": safe, "dtp_within_one_start": within,
                     "copy_at_first_start": bool(branches["copy"].iloc[0]),
                     "alignment_lost": (None if align is None or empirical is None
                                        else float(align[starts[0]] - align[empirical]))})
    return pd.DataFrame(rows).astype({"empirical_step": "Int64", "dtp_step": "Int64", "stp_step": "Int64"})


def transition_summary(transitions, starts: list[int], steps: int) -> dict:
    """Fractions of images where DTP falls at or after the empirical step (safe) and within one start of it,
    and the mean alignment lost by starting CFG at the empirical step rather than the first start; over all
    images, over those whose first start copies (memorized), and per group."""

    def summary(rows) -> dict:
        if len(rows) == 0:
            return {"images": 0}
        lost = rows.alignment_lost.dropna()
        return {"images": len(rows), "dtp_safe_fraction": float(rows.dtp_safe.mean()),
                "dtp_within_one_start_fraction": float(rows.dtp_within_one_start.mean()),
                "dtp_never_fraction": float(rows.dtp_step.isna().mean()),
                "no_exit_fraction": float(rows.empirical_step.isna().mean()),
                "empirical_step_mean": None if rows.empirical_step.isna().all() else float(rows.empirical_step.mean()),
                "dtp_step_mean": None if rows.dtp_step.isna().all() else float(rows.dtp_step.mean()),
                "alignment_lost_mean": float(lost.mean()) if len(lost) else None,
                "agreement": {str(k): int(v) for k, v in rows.agreement.value_counts().items()}}

    out = {"all": summary(transitions), "memorized": summary(transitions[transitions.copy_at_first_start])}
    if transitions.group.notna().any() and transitions.group.nunique() > 1:
        out["groups"] = {str(g): summary(rows) for g, rows in transitions.groupby("group", sort=False)}
    return out


def write_strips(run_dir, frame, transitions, records, starts: list[int], steps: int, max_rows: int = 8) -> None:
    """``basin.png``: per (prompt, its first seed), up to ``max_rows``, the images by start step left to right (red
    frame: copy), the prefix's own image last, and under them ``d_t`` of the prefix with the empirical
    transition (green), DTP's switch (blue) and STP's (grey) marked."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    chosen = transitions.drop_duplicates("prompt_idx").head(max_rows)  # seeds differ by prompt (seed_scheme)
    n = len(starts)
    fig, axes = plt.subplots(2 * len(chosen), 1, figsize=(1.1 * (n + 1) + 1, 2.6 * len(chosen)), squeeze=False,
                             height_ratios=[1, 0.9] * len(chosen))
    where = lambda k: np.interp(k, [*starts, steps], [*range(n), n])
    for r, row in enumerate(chosen.itertuples()):
        ax_i, ax_d = axes[2 * r, 0], axes[2 * r + 1, 0]
        branches = frame[(frame.prompt_idx == row.prompt_idx) & (frame.seed == row.seed)].sort_values("start")
        tiles = [np.asarray(Image.open(run_dir / f).convert("RGB").resize((64, 64), Image.NEAREST))
                 for f in branches.file]
        tiles.append(np.asarray(Image.open(run_dir / "images" / branch_name(row.prompt_idx, row.seed, None))
                                .convert("RGB").resize((64, 64), Image.NEAREST)))
        ax_i.imshow(np.concatenate(tiles, axis=1), extent=(-0.5, n + 0.5, 0, 1), aspect="auto")
        for c, copied in enumerate(branches["copy"]):
            ax_i.add_patch(plt.Rectangle((c - 0.48, 0.02), 0.96, 0.96, fill=False, lw=2,
                                         color="red" if copied else "limegreen"))
        ax_i.set_xticks(range(n + 1), [*map(str, starts), "no CFG"], fontsize=7)
        ax_i.set_yticks([])
        ax_i.set_title(f"{row.prompt[:70]} (seed {row.seed}): empirical {row.empirical_step}, DTP {row.dtp_step}, "
                       f"STP {row.stp_step}", fontsize=8)
        d = records[(row.prompt_idx, row.seed, None)].d
        ax_d.plot(where(np.arange(len(d))), d, "k-", lw=1)
        ax_d.plot(range(n), [d[k] for k in starts], "ko", ms=3)
        for value, colour, style in [(row.empirical_step, "green", "-"), (row.dtp_step, "blue", "--"),
                                     (row.stp_step, "grey", ":")]:
            if not pd.isna(value):
                ax_d.axvline(where(int(value)), color=colour, ls=style, lw=1.5)
        ax_d.set_xlim(-0.5, n + 0.5)
        ax_d.set_yscale("log")
        ax_d.set_ylabel(r"$d_t$", fontsize=8)
        ax_d.set_xticks(range(n + 1), [*map(str, starts), str(steps)], fontsize=7)
    axes[-1, 0].set_xlabel("step at which CFG starts (frame: red copy, green not; line: green empirical, "
                           "blue DTP, grey STP)", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "basin.png", dpi=90)
    plt.close(fig)
