"""``memguard plot``: what the network predicts along the trajectory, as the paper's Figures 3, 9, 10 and 12; and
the trade-off figure of ``memguard tables`` (:func:`plot_tradeoff`).

Per run folder (a column) and prompt group (a row): the mean over images of ``||eps_c||_2``, ``||eps_u||_2``
and ``||eps_c - eps_u||_2 = sqrt(d_t)`` per timestep (eps units for eps- and v-prediction models alike), log
scale, timesteps from ``T`` down to 0 as the paper draws them; the median transition timestep of the group's
images (first step with positive guidance) is a dashed line.
"""

from __future__ import annotations

import re
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


def set_margins(fig, left: float, right: float, top: float, bottom: float, wgap: float = 0.0,
                hgap: float = 0.0) -> None:
    """Place ``fig``'s grid of axes by margins and gaps in inches: for the figures every run draws, whose labels
    are known in advance, instead of ``tight_layout`` (which measures every text first: a third of a figure's time)."""
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    cell_w = (width - left - right - wgap * (cols - 1)) / cols
    cell_h = (height - top - bottom - hgap * (rows - 1)) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wgap / cell_w, hspace=hgap / cell_h)


def plot_norms(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Draw the figure for ``run_dirs`` side by side; returns its path (default ``run_dirs[0]/norms.png``)."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

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
    set_margins(fig, left=1.0, right=0.15, top=0.3, bottom=0.5, wgap=0.3, hgap=0.35)
    path = Path(output) if output is not None else Path(run_dirs[0]) / "norms.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


NUMBER = re.compile(r"\d+(?:\.\d+)?")


def sweeps(names: list[str]) -> list[list[str]]:
    """Runs of one mitigation that differ in one number of their name, each sweep ordered by that number:
    ``stp_t300, stp_t500, stp_t700`` (STP's tau), ``wen_l1, wen_l3`` (Wen et al.'s target), ``interval_600_0,
    interval_700_0``; where two numbers vary (``og_stp_t500_og2``, ``og_stp_t500_og4``, ``og_stp_t300_og2``), the
    last one is the sweep's and the others pick its line."""
    families: dict[str, list[tuple[tuple[float, ...], str]]] = {}
    for name in dict.fromkeys(names):
        numbers = tuple(float(n) for n in NUMBER.findall(name))
        if numbers:
            families.setdefault(NUMBER.sub("#", name), []).append((numbers, name))
    lines = []
    for members in families.values():
        varying = [i for i in range(len(members[0][0])) if len({m[0][i] for m in members}) > 1]
        if not varying:
            continue
        axis = varying[-1]
        by_rest: dict[tuple[float, ...], list[tuple[tuple[float, ...], str]]] = {}
        for numbers, name in members:
            by_rest.setdefault(numbers[:axis] + numbers[axis + 1:], []).append((numbers, name))
        lines += [[name for _, name in sorted(line, key=lambda m: m[0][axis])] for line in by_rest.values()
                  if len(line) > 1]
    return lines


def plot_tradeoff(frame: pd.DataFrame, path: Path, title: str, copies: str, alignment: str, label: str,
                  group: str | None, run: str, copies_label: str, alignment_label: str) -> list[dict] | None:
    """Copies (``frame[copies]``) against alignment (``frame[alignment]``), one point per row (mitigation) with
    its ``_lo`` / ``_hi`` intervals as error bars, one panel per prompt group (``frame[group]``); runs of one
    sweep (:func:`sweeps` of the run names ``frame[run]``) joined by a line, ``none`` a black star. Written to
    ``path`` (PNG); returns the points drawn (panel, label, run, x, y), or None (no figure) where no row has both."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    if copies not in frame or alignment not in frame:
        return None
    rows = frame[frame[copies].notna() & frame[alignment].notna()]
    if rows.empty:
        return None
    panels = list(dict.fromkeys(rows[group])) if group in rows else ["all"]
    names = [str(r).rsplit("/", 1)[-1] for r in rows[run]]
    labels = dict(zip(names, rows[label].astype(str)))
    lines = sweeps(names)
    families = list(dict.fromkeys([line[0] for line in lines] + [n for n in names if n != "none"
                                                                  and not any(n in line for line in lines)]))
    palette = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colour = {"none": "black"} | {n: palette(i % palette.N) for i, n in enumerate(families)}
    marker = {"none": "*"} | {n: "o" for n in families}
    for line in lines:  # one colour per sweep, a marker per value
        for k, n in enumerate(line):
            colour[n], marker[n] = colour[line[0]], "os^Dv<>PXh"[k % 10]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.8, 3.7), sharey=True, squeeze=False)
    points, handles = [], {}

    def bar(r: pd.Series, column: str) -> list[list[float]]:
        lo, hi = r.get(f"{column}_lo"), r.get(f"{column}_hi")
        v = float(r[column])
        return [[max(v - float(lo), 0.0) if pd.notna(lo) else 0.0], [max(float(hi) - v, 0.0) if pd.notna(hi) else 0.0]]

    for ax, panel in zip(axes[0], panels):
        here = rows[rows[group] == panel] if group in rows else rows
        here_names = [str(r).rsplit("/", 1)[-1] for r in here[run]]
        for line in sweeps(here_names):
            ordered = here.set_index(pd.Index(here_names)).loc[line]
            ax.plot(ordered[alignment], ordered[copies], "-", color=colour[line[0]], lw=1, alpha=0.7, zorder=1)
        for (_, r), name in zip(here.iterrows(), here_names):
            x, y = float(r[alignment]), float(r[copies])
            handles[name] = ax.errorbar(x, y, xerr=bar(r, alignment), yerr=bar(r, copies), ls="none", elinewidth=0.7,
                                        capsize=1.5, zorder=3 if name == "none" else 2, color=colour[name],
                                        marker=marker[name], ms=10 if name == "none" else 5, alpha=0.9)
            points.append({"panel": str(panel), "label": str(r[label]), "run": name, "x": x, "y": y})
        ax.set_title(f"{group.lower()}: {panel}" if group in rows else "all prompts", fontsize=9)
        ax.set_xlabel(alignment_label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(copies_label, fontsize=8)
    members = {line[0]: line for line in lines}
    order = [n for n in ["none", *(m for f in families for m in members.get(f, [f]))] if n in handles]
    right = 1 - 1.8 / fig.get_figwidth()
    fig.legend([handles[n] for n in order], [labels[n] for n in order], loc="center left",
               bbox_to_anchor=(right + 0.005, 0.5), fontsize=7, frameon=False)
    fig.suptitle(f"{title}: copies (down is better) against alignment (right is better)\n"
                 "bars: 95% bootstrap intervals over prompts; lines: sweeps of one mitigation", fontsize=8.5)
    fig.tight_layout(rect=(0, 0, right, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return points
