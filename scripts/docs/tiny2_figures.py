"""Figures of docs/tiny2.md from a probe's run folders (scripts/probes/tiny_probe.py --scenario tiny2 --tag TAG).

Writes docs/tiny2/d_curves_TAG.png (mean zero-guidance d_t per step and caption group, log scale) and
docs/tiny2/grid_TAG.png (top row: the duplicated training images, each above its caption's columns; then CFG,
DTP and zero guidance for four seeds (--seeds, default 100-103); columns: the 4 trigger captions, one shared, two
unique).

Usage: python scripts/docs/tiny2_figures.py --tag t1 [--data outputs/data/tiny2] [--seeds 100:104]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def d_curves(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = pd.read_csv(runs / "uncond" / "trajectories.csv").merge(
        pd.read_csv(runs / "uncond" / "generations.csv")[["prompt_idx", "seed", "group"]], on=["prompt_idx", "seed"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for group, rows in traj.groupby("group", sort=False):
        mean = rows.groupby("step").d.mean()
        ax.semilogy(mean.index, mean.values, label=group)
    ax.set(xlabel="step (DPM-Solver++, 50)", ylabel="mean d_t, zero guidance", title=runs.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def grid(runs: Path, data: Path, out: Path, seeds: range = range(100, 104)) -> None:
    prompts = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines() if line.strip()]
    columns = [i for i, p in enumerate(prompts) if p["group"] == "trigger"]
    columns += [next(i for i, p in enumerate(prompts) if p["group"] == "shared")]
    columns += [i for i, p in enumerate(prompts) if p["group"] == "unique"][:2]

    def load(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    blank = np.zeros_like(load(data / "images" / "00000.png"))
    top = [load(data / "images" / f"{i:05d}.png") if prompts[i]["group"] != "unique" and k == 0 else blank
           for i in columns for k in range(len(seeds))]
    rows = [top] + [[load(runs / name / "images" / f"{i:05d}_{s}.png") for i in columns for s in seeds]
                    for name in ("none", "dtp", "uncond")]
    image = np.concatenate([np.concatenate(r, 1) for r in rows], 0)
    Image.fromarray(image).resize((image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--data", default="outputs/data/tiny2")
    parser.add_argument("--seeds", default="100:104", help="first:last+1, the grid's columns per caption")
    options = parser.parse_args()
    first, stop = (int(x) for x in options.seeds.split(":"))
    runs = ROOT / "outputs" / "runs" / "probe" / options.tag
    folder = ROOT / "docs" / "tiny2"
    folder.mkdir(parents=True, exist_ok=True)
    d_curves(runs, folder / f"d_curves_{options.tag}.png")
    grid(runs, ROOT / options.data, folder / f"grid_{options.tag}.png", range(first, stop))


if __name__ == "__main__":
    main()
