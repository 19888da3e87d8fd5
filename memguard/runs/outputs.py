"""What a run writes beside its images: ``trajectories.csv``, ``generations.csv``, ``grid.png``,
``d_curves.png``, ``norms.png``, ``report.html`` and the summaries that go into ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memguard.metrics.bootstrap import intervals, with_intervals
from memguard.runs.folder import Record, atomic_write_text
from memguard.runs.plots import plot_norms, set_margins
from memguard.runs.prompt_files import Prompts
from memguard.runs.report import write_grid, write_report


def transition_summary(records: list[Record]) -> dict[str, Any]:
    """How often, and at which step, positive guidance began: a schedule that never engages shows here. The
    fractions and the mean step have bootstrap intervals over prompts (``_lo`` / ``_hi``, as the evaluation's)."""
    steps = [r.transition_step for r in records]
    fired = sorted(s for s in steps if s is not None)
    histogram: dict[str, int] = {}
    for s in fired:
        histogram[str(s)] = histogram.get(str(s), 0) + 1
    prompts = np.array([r.prompt_idx for r in records])
    fired_flags = np.array([s is not None for s in steps], dtype=np.float64)
    step_values = np.array([np.nan if s is None else s for s in steps], dtype=np.float64)
    bounds = intervals(prompts, {"fired_fraction": (fired_flags, "mean"), "never_fired_fraction": (1 - fired_flags, "mean"),
                                 "step_mean": (step_values, "mean")})
    return with_intervals({
        "fired_fraction": len(fired) / len(records),
        "never_fired_fraction": 1 - len(fired) / len(records),
        "step_mean": sum(fired) / len(fired) if fired else None,
        "step_median": fired[len(fired) // 2] if fired else None,
        "step_histogram": histogram,
    }, bounds)


def transition_groups(records: list[Record], groups: list[str | None]) -> dict[str, Any]:
    """``{"groups": {group: transition_summary}}`` where the prompts carry more than one group, else empty."""
    by: dict[str, list[Record]] = {}
    for r in records:
        if groups[r.prompt_idx] is not None:
            by.setdefault(str(groups[r.prompt_idx]), []).append(r)
    return {"groups": {g: transition_summary(rs) for g, rs in by.items()}} if len(by) > 1 else {}


def baseline_summary(records: list[Record]) -> dict[str, Any]:
    """Means of what the mitigation's slots (:mod:`memguard.mitigations`) reported per image (iterations, norms,
    fraction that reached the target, ``unet_evals_before``), so a method that stops at its iteration cap shows
    in metrics.json (under ``embedding_baseline``, the name it had when the embedding was the only such slot)."""
    infos = [r.baseline for r in records if r.baseline]
    if not infos:
        return {}
    return {"embedding_baseline": {k: sum(float(i[k]) for i in infos) / len(infos) for k in infos[0]}}


def write_tables(run_dir: Path, records: list[Record], prompts: Prompts) -> None:
    atomic_write_text(run_dir / "trajectories.csv", pd.DataFrame([
        {"prompt_idx": r.prompt_idx, "seed": r.seed, "step": k, "timestep": t, "d": d, "scale": s,
         "norm_c": r.norm_c[k] if r.norm_c else None, "norm_u": r.norm_u[k] if r.norm_u else None}
        for r in records for k, (t, d, s) in enumerate(zip(r.timesteps, r.d, r.scale))
    ]).to_csv(index=False))
    atomic_write_text(run_dir / "generations.csv", pd.DataFrame([
        {"prompt_idx": r.prompt_idx, "prompt": r.prompt, "group": prompts.groups[r.prompt_idx],
         "reference_key": prompts.reference_keys[r.prompt_idx], "seed": r.seed, "file": f"images/{r.file}",
         "model_prompt": r.model_prompt, **(r.baseline or {}), **({"decision": r.decision} if r.decision else {}),
         "transition_step": r.transition_step,
         "transition_timestep": None if r.transition_step is None else r.timesteps[r.transition_step]}
        for r in records
    ]).astype({"transition_step": "Int64"}).to_csv(index=False))


def write_figures(run_dir: Path, records: list[Record], max_rows: int = 8, max_cols: int = 8) -> None:
    """``grid.png`` (rows: prompts, columns: each prompt's images by seed), ``d_curves.png`` (d_t and s per step, every image),
    ``norms.png`` (where the norms were recorded) and ``report.html``."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    write_grid(run_dir, max_rows, max_cols)  # from generations.csv, written first by write_tables
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
    set_margins(fig, left=0.85, right=0.15, top=0.35, bottom=0.5, hgap=0.15)
    fig.savefig(run_dir / "d_curves.png", dpi=100)
    plt.close(fig)
    if all(r.norm_c for r in records):
        plot_norms([run_dir])
    write_report(run_dir)
