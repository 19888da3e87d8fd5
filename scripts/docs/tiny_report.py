"""The tiny scenario's report: figures under docs/tiny/ and the section of docs/tiny.md between its markers.

Reads the run folders that `make tiny-report` makes (outputs/runs/tiny/<mitigation>/) and writes

    docs/tiny/d_curves.png         mean d_t per step under zero guidance (uncond), per caption group
    docs/tiny/transition_sweep.png CFG from a static transition point tau on: copy fraction and alignment
    docs/tiny/grid.png             the trigger captions under each mitigation (rows) and seeds (columns)

and replaces docs/tiny.md's text between "<!-- tiny-report:start -->" and "<!-- tiny-report:end -->" with the
table (from `memguard tables`) and links to the figures. Usage: python scripts/docs/tiny_report.py [--output-dir outputs]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

import memguard  # noqa: F401  (import order)

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from PIL import Image

from memguard.tables import display, tiny_table, to_markdown

ROOT = Path(__file__).resolve().parents[2]
GRID_ROWS = ("none", "stp_t300", "stp_t500", "dtp", "og_dtp", "uncond")
START, END = "<!-- tiny-report:start -->", "<!-- tiny-report:end -->"


def load_run(folder: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    return (json.loads((folder / "metrics.json").read_text()), pd.read_csv(folder / "generations.csv"),
            pd.read_csv(folder / "trajectories.csv"))


def d_curves(runs: Path, out: Path) -> None:
    _, gens, traj = load_run(runs / "uncond")
    traj = traj.merge(gens[["prompt_idx", "seed", "group"]], on=["prompt_idx", "seed"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for group, rows in traj.groupby("group", sort=False):
        mean = rows.groupby("step").d.mean()
        ax.plot(mean.index, mean.values, label=f"{group} captions")
    ax.set_yscale("log")
    ax.set_xlabel("sampling step (DPM-Solver++, 50 steps)")
    ax.set_ylabel(r"mean $d_t=\|\epsilon_c-\epsilon_u\|^2$")
    ax.set_title("zero guidance (mitigation=uncond)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "d_curves.png", dpi=110)
    plt.close(fig)


def transition_sweep(runs: Path, out: Path) -> pd.DataFrame:
    points = []
    for folder in sorted(runs.glob("stp_t*")):
        metrics, gens, traj = load_run(folder)
        sim, align = metrics["similarity"]["groups"], metrics["alignment"]["groups"]
        points.append({"tau": int(folder.name.removeprefix("stp_t")),
                       "first CFG step": metrics["transition"]["step_median"],
                       "copy fraction (trigger)": sim["trigger"]["copy_fraction"],
                       "copy fraction (shared)": sim["shared"]["copy_fraction"],
                       "alignment (trigger)": align["trigger"]["mean"],
                       "alignment (unique)": align["unique"]["mean"]})
    frame = pd.DataFrame(points).sort_values("tau", ascending=False)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for column, style in [("copy fraction (trigger)", "o-"), ("copy fraction (shared)", "s-"),
                          ("alignment (trigger)", "^--"), ("alignment (unique)", "v--")]:
        ax.plot(frame.tau, frame[column], style, label=column)
    ax.invert_xaxis()
    ax.set_xlabel(r"static transition point $\tau$ (CFG 7.5 for $t \leq \tau$, none before)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transition_sweep.png", dpi=110)
    plt.close(fig)
    return frame


def grid(runs: Path, out: Path, seeds: int = 8, side: int = 48) -> None:
    rows = [m for m in GRID_ROWS if (runs / m / "generations.csv").is_file()]
    gens = {m: pd.read_csv(runs / m / "generations.csv") for m in rows}
    triggers = gens[rows[0]].query("group == 'trigger'").prompt_idx.unique()
    canvas = Image.new("RGB", (side * seeds * len(triggers) + 8 * (len(triggers) - 1), side * len(rows)), "white")
    for r, mitigation in enumerate(rows):
        for t, idx in enumerate(triggers):
            files = gens[mitigation].query("prompt_idx == @idx").file.tolist()[:seeds]
            for c, file in enumerate(files):
                tile = Image.open(runs / mitigation / file).convert("RGB").resize((side, side), Image.NEAREST)
                canvas.paste(tile, ((t * seeds + c) * side + 8 * t, r * side))
    canvas.save(out / "grid.png")
    (out / "grid_rows.txt").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    options = parser.parse_args()
    runs, out = options.output_dir / "runs" / "tiny", ROOT / "docs" / "tiny"
    out.mkdir(parents=True, exist_ok=True)
    d_curves(runs, out)
    sweep = transition_sweep(runs, out)
    grid(runs, out)
    table = display(tiny_table(options.output_dir / "runs").drop(columns=["run"]))  # 3 digits [95% interval]
    by = json.loads((runs / "none" / "metrics.json").read_text())
    section = "\n".join([
        START,
        to_markdown(table),
        f"Similarity: `{by['similarity']['embedder']}`, copy threshold {by['similarity']['copy_threshold']:.4f}; "
        f"alignment: `{by['alignment']['scorer']}`; FID-like: `{by['fid']['kind']}` ({by['fid']['features']}).",
        "",
        "Transition sweep (static transition point tau; trigger and shared captions' copy fraction, alignment):",
        "",
        to_markdown(sweep.round(4)),
        "![mean d_t under zero guidance](tiny/d_curves.png) ![transition sweep](tiny/transition_sweep.png)",
        "",
        f"![trigger captions under each mitigation](tiny/grid.png)  \nRows, top to bottom: "
        f"{', '.join((out / 'grid_rows.txt').read_text().split())}; each block of 8 columns is one trigger caption.",
        END,
    ])
    page = ROOT / "docs" / "tiny.md"  # the documentation site's page (links relative to docs/)
    text = page.read_text()
    if START not in text:
        raise SystemExit(f"docs/tiny.md has no {START} marker")
    page.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.DOTALL))
    print(section)


if __name__ == "__main__":
    main()
