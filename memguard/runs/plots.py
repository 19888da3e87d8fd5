"""``memguard plot``: what the network predicts along the trajectory, as the paper's Figures 3, 9, 10 and 12.

Per run folder (a column) and prompt group (a row): the mean over images of ``||eps_c||_2``, ``||eps_u||_2``
and ``||eps_c - eps_u||_2 = sqrt(d_t)`` per timestep (eps units for eps- and v-prediction models alike), log
scale, timesteps from ``T`` down to 0 as the paper draws them; the median transition timestep of the group's
images (first step with positive guidance) is a dashed line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from memguard.errors import UserError


def load_norms(run_dir: Path) -> pd.DataFrame:
    """``trajectories.csv`` joined with each image's group and transition timestep; refuses a folder whose
    trajectories carry no recorded norms."""
    traj_file, gens_file = run_dir / "trajectories.csv", run_dir / "generations.csv"
    if not traj_file.is_file() or not gens_file.is_file():
        raise UserError(f"run_dir={str(run_dir)!r} has no trajectories.csv / generations.csv; "
                        "make it with `memguard run` first")
    traj = pd.read_csv(traj_file)
    if "norm_c" not in traj or (traj.norm_c.isna() & traj.norm_u.isna()).any():  # (trajectory=off: one of the two)
        raise UserError(f"run_dir={str(run_dir)!r} has no recorded norm_c/norm_u in trajectories.csv (made before "
                        "memguard recorded them); make it again: delete its images/ and re-run the same command")
    gens = pd.read_csv(gens_file, usecols=["prompt_idx", "seed", "group", "transition_timestep"])
    gens["group"] = ["all" if pd.isna(g) else str(g) for g in gens.group]
    traj = traj.merge(gens, on=["prompt_idx", "seed"])
    traj["norm_d"] = traj.d.clip(lower=0) ** 0.5
    return traj


def plot_norms(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Draw the figure for ``run_dirs`` side by side; returns its path (default ``run_dirs[0]/norms.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = [load_norms(Path(r)) for r in run_dirs]
    groups = list(dict.fromkeys(g for t in tables for g in t.group))
    fig, axes = plt.subplots(len(groups), len(tables), figsize=(3.6 * len(tables), 2.6 * len(groups)),
                             sharex=True, sharey=True, squeeze=False)
    curves = (("norm_c", r"$\|\epsilon_\theta(x_t, e_p)\|$", "C0"), ("norm_u", r"$\|\epsilon_\theta(x_t, e_\emptyset)\|$", "C1"),
              ("norm_d", r"$\|\epsilon_\theta(x_t, e_p) - \epsilon_\theta(x_t, e_\emptyset)\|$", "C3"))
    for col, (run_dir, table) in enumerate(zip(run_dirs, tables)):
        for row, group in enumerate(groups):
            ax = axes[row][col]
            rows = table[table.group == group]
            if rows.empty:
                ax.set_axis_off()
                continue
            mean = rows.groupby("timestep", sort=False)[[c for c, _, _ in curves]].mean()
            for column, label, colour in curves:
                ax.plot(mean.index, mean[column], color=colour, label=label, lw=1.2)
            switches = rows.drop_duplicates(["prompt_idx", "seed"]).transition_timestep.dropna()
            if len(switches) and switches.median() < mean.index.max():
                ax.axvline(switches.median(), color="0.3", ls="--", lw=0.8, label="median transition")
            ax.set_yscale("log")
            ax.set_title(f"{Path(run_dir).name} · {group} ({rows[['prompt_idx', 'seed']].drop_duplicates().shape[0]} images)",
                         fontsize=8)
            if row == len(groups) - 1:
                ax.set_xlabel("timestep t")
            if col == 0:
                ax.set_ylabel("mean L2 norm")
    axes[0][0].invert_xaxis()
    axes[0][0].legend(fontsize=6, loc="center left")
    fig.tight_layout()
    path = Path(output) if output is not None else Path(run_dirs[0]) / "norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
