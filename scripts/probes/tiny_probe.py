"""One fixed protocol to measure a tiny model against the paper's mechanism (every recipe measured the same way).

Runs `memguard run -m scenario=S model.path=M mitigation=uncond,none,dtp` (plus, with --taus, a static
transition sweep `mitigation=stp mitigation.schedule.tau=...`) on every evaluation prompt with the given seeds,
CFG 7.5, DPM-Solver++ 50 steps (the sampler, schedules and metrics unchanged), into
outputs/runs/probe/<tag>/<mitigation>, then prints and writes outputs/runs/probe/<tag>/probe.json:

- per caption group, the mean d_t per step under zero guidance (uncond): its peak step and value, the lowest
  value after the peak before the last 10 steps and the fall ratio peak / that minimum, and d_t at a few steps;
- DTP: fraction of images that switched and the median switch step, per group;
- copy fraction, alignment and FID-like under none and dtp, per group;
- the issue's success criteria, each true or false.

Usage: python scripts/probes/tiny_probe.py --tag a --model outputs/train/tiny_ft/model [--scenario tiny_ft]
       [--seeds 100:116] [--taus 800,600,400,200] [--extra key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]


def memguard_run(*overrides: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "memguard.cli", "run", "-m", *overrides], check=True, env=env, cwd=ROOT)


def d_shape(mean: pd.Series, tail: int = 10) -> dict:
    """Peak of the mean d_t curve, and how far it falls after the peak before the last ``tail`` steps."""
    last = int(mean.index.max())
    peak_step = int(mean.idxmax())
    window = mean.loc[peak_step:last - tail]
    low = float(window.min()) if len(window) else None  # None: the peak is within the last 10 steps
    return {"peak_step": peak_step, "peak": float(mean.max()), "min_after_peak_before_last_10": low,
            "fall_ratio": float(mean.max()) / low if low else None,
            "at_step": {str(k): float(mean.loc[k]) for k in (0, 10, 20, 30, 40, last) if k in mean.index}}


def summarise(runs: Path) -> dict:
    def load(name: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
        folder = runs / name
        return (json.loads((folder / "metrics.json").read_text()), pd.read_csv(folder / "generations.csv"),
                pd.read_csv(folder / "trajectories.csv"))

    _, gens, traj = load("uncond")
    traj = traj.merge(gens[["prompt_idx", "seed", "group"]], on=["prompt_idx", "seed"])
    summary: dict = {"d_uncond": {g: d_shape(rows.groupby("step").d.mean())
                                  for g, rows in traj.groupby("group", sort=False)}}
    m_none, _, _ = load("none")
    m_dtp, g_dtp, _ = load("dtp")
    summary["dtp_switch"] = {g: {"switched_fraction": float(rows.transition_step.notna().mean()),
                                 "median_step": None if rows.transition_step.isna().all()
                                 else float(rows.transition_step.median())}
                             for g, rows in g_dtp.groupby("group", sort=False)}
    summary["table"] = {m: {g: {"copy_fraction": metrics["similarity"]["groups"][g]["copy_fraction"],
                                "alignment": metrics["alignment"]["groups"][g]["mean"]}
                            for g in metrics["similarity"]["groups"]} | {"fid_like": metrics["fid"]["value"]}
                        for m, metrics in (("none", m_none), ("dtp", m_dtp))}
    sweep = {}
    for folder in sorted(runs.glob("stp_t*")):
        metrics = json.loads((folder / "metrics.json").read_text())
        sweep[folder.name.removeprefix("stp_t")] = {
            g: {"copy_fraction": metrics["similarity"]["groups"][g]["copy_fraction"],
                "alignment": metrics["alignment"]["groups"][g]["mean"]} for g in metrics["similarity"]["groups"]}
    if sweep:
        summary["stp_sweep"] = sweep
    t, d, s = summary["table"], summary["d_uncond"], summary["dtp_switch"]
    flat = {g: d[g]["at_step"][str(max(int(k) for k in d[g]["at_step"]))] <= 3 * d[g]["at_step"]["0"] for g in d}
    summary["criteria"] = {
        "trigger d_t peaks then falls >= 3x before the last 10 steps": (d["trigger"]["fall_ratio"] or 0) >= 3,
        "dtp switches >= 90% of trigger images": s["trigger"]["switched_fraction"] >= 0.9,
        "dtp cuts trigger copies by >= 50%": t["dtp"]["trigger"]["copy_fraction"]
        <= 0.5 * t["none"]["trigger"]["copy_fraction"],
        "dtp keeps >= 90% of trigger alignment": t["dtp"]["trigger"]["alignment"]
        >= 0.9 * t["none"]["trigger"]["alignment"],
        "unique d_t flat or falling (last <= 3x first)": flat["unique"],
        "dtp costs unique captions < 10% alignment": t["dtp"]["unique"]["alignment"]
        >= 0.9 * t["none"]["unique"]["alignment"],
    }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scenario", default="tiny_ft")
    parser.add_argument("--seeds", default="100:116", help="first:last+1; the default seeds were never tuned on")
    parser.add_argument("--taus", default="", help="static transition points to sweep, e.g. 800,600,400,200")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. dataset.folder=...")
    options = parser.parse_args()
    first, stop = (int(x) for x in options.seeds.split(":"))
    common = [f"scenario={options.scenario}", f"model.path={Path(options.model).resolve()}",
              f"seeds=[{','.join(map(str, range(first, stop)))}]", "threads=1", "progress=false",
              f"run_name=probe/{options.tag}/${{mitigation.name}}", *options.extra]
    memguard_run(*common, "mitigation=uncond,none,dtp")
    if options.taus:
        memguard_run(*common, "mitigation=stp", f"mitigation.schedule.tau={options.taus}")
    runs = ROOT / "outputs" / "runs" / "probe" / options.tag
    summary = summarise(runs)
    (runs / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
