"""``memguard compare``'s tables: per sweep point and seed split, copies and alignment with intervals; per method its
operating point under the alignment budget; the leaderboard as CSV, Markdown, a sortable HTML page, trade-off curves.

Split (frozen by seed rank): of each prompt's seeds in order, the first ``ceil(fraction n)`` are the *calibration*
seeds, on which the operating point is chosen; the rest are *held out*, on which it is reported. Operating point:
among a method's points whose control alignment on the calibration seeds is at least ``(1 - budget)`` times
``none``'s, the one with the lowest memorized similarity (95th percentile), then copy fraction, then seconds.
Intervals: the percentile bootstrap over prompts (:mod:`memguard.metrics.bootstrap`).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memguard.errors import UserError
from memguard.metrics.bootstrap import Above, Percentile, interval

SPLITS = ("calibration", "held_out")
# (column, what it measures, prompts): the per-point measures, each with _lo and _hi
MEASURES = (("mem_sim_p95", "similarity p95", "memorized"), ("mem_copy_fraction", "copy fraction", "memorized"),
            ("mem_alignment", "alignment", "memorized"), ("ctl_copy_fraction", "copy fraction", "control"),
            ("ctl_alignment", "alignment", "control"))


def seed_split(generations: pd.DataFrame, fraction: float) -> pd.Series:
    """Per image, ``calibration`` or ``held_out`` by its seed's rank among its prompt's seeds."""
    if not 0 < fraction < 1:
        raise UserError(f"compare.calibration_seeds={fraction} must lie in (0, 1): the fraction of each prompt's "
                        "seeds that choose the operating point")
    rank = generations.groupby("prompt_idx").seed.rank(method="dense") - 1
    per_prompt = generations.groupby("prompt_idx").seed.transform("nunique")
    first = np.ceil(per_prompt * fraction).clip(upper=per_prompt - 1)
    return pd.Series(np.where(rank < first, "calibration", "held_out"), index=generations.index)


def _measure(values: pd.Series, prompts: pd.Series, statistic: Any) -> tuple[float, float, float]:
    x = values.to_numpy(dtype=np.float64)
    if not len(x):
        return math.nan, math.nan, math.nan
    if statistic == "mean":
        value = float(np.nanmean(x))
    elif isinstance(statistic, Percentile):
        value = float(np.nanpercentile(x, statistic.q))
    else:
        value = float(np.nanmean(x > statistic.threshold))
    lo, hi = interval(x, prompts.to_numpy(), statistic)
    return value, lo, hi


def point_rows(run_dir: Path, method: str, name: str, point: dict[str, Any], fraction: float,
               control: list[str], cost: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split of one evaluated run folder."""
    generations = pd.read_csv(run_dir / "generations.csv")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not {"similarity", "alignment"} <= set(generations.columns):
        raise UserError(f"{run_dir} has no similarity or alignment per image: compare needs a metrics option with "
                        "both stages (the scenario's own, e.g. metrics=tiny or metrics=paper), not metrics=none")
    similarity = metrics.get("similarity", {})
    threshold = similarity.get("copy_threshold") or similarity.get("threshold")
    is_control = generations.group.astype(str).isin(control)
    if not is_control.any() or is_control.all():
        raise UserError(f"{run_dir}: compare needs memorized prompts and control prompts (groups {control}); the "
                        "scenario's groups are " + ", ".join(sorted(generations.group.astype(str).unique())))
    split = seed_split(generations, fraction)
    rows = []
    for part in SPLITS:
        row: dict[str, Any] = {"method": method, "point": name, "knobs": json.dumps(point), "split": part,
                               "n_images": int((split == part).sum()), "copy_threshold": threshold}
        for column, _, prompts in MEASURES:
            keep = (split == part) & (is_control if prompts == "control" else ~is_control)
            kind = column.split("_", 1)[1]
            statistic = Percentile(95) if kind == "sim_p95" else Above(float(threshold)) if kind == "copy_fraction" \
                else "mean"
            source = generations.alignment if kind == "alignment" else generations.similarity
            row[column], row[f"{column}_lo"], row[f"{column}_hi"] = _measure(source[keep], generations.prompt_idx[keep],
                                                                             statistic)
        rows.append({**row, **cost, "run_dir": str(run_dir)})
    return rows


def operating_points(points: pd.DataFrame, budget: float) -> pd.DataFrame:
    """Per method, its chosen point on the calibration seeds (module docstring), reported on the held-out seeds;
    a method with no point within the budget gets a row saying so (its numbers empty)."""
    calibration = points[points.split == "calibration"]
    floor = (1 - budget) * float(calibration[calibration.method == "none"].ctl_alignment.iloc[0])
    held = points[points.split == "held_out"].set_index(["method", "point"])
    none_held = held.loc["none"].iloc[0]
    rows = []
    for method, group in calibration.groupby("method", sort=False):
        eligible = group[group.ctl_alignment >= floor]
        if eligible.empty:
            rows.append({"method": method, "point": "no point within the budget"})
            continue
        best = eligible.sort_values(["mem_sim_p95", "mem_copy_fraction", "seconds_per_image"]).iloc[0]
        row = held.loc[(method, best.point)]
        rows.append({"method": method, "point": best.point, **{c: row[c] for c in row.index if c not in ("knobs",)},
                     "ctl_alignment_loss": 1 - row.ctl_alignment / none_held.ctl_alignment,
                     "time_vs_none": row.seconds_per_image / none_held.seconds_per_image,
                     "forward_vs_none": row.forward_per_image / none_held.forward_per_image})
    board = pd.DataFrame(rows)
    return board.sort_values(["mem_copy_fraction", "mem_sim_p95"], na_position="last", kind="stable") \
        .reset_index(drop=True) if "mem_copy_fraction" in board else board


# The leaderboard's columns: (header, column, format)
COLUMNS = (("Method", "method", "{}"), ("Operating point", "point", "{}"),
           ("Memorized: similarity p95", "mem_sim_p95", "{:.3f}"), ("Memorized: copy fraction", "mem_copy_fraction",
                                                                   "{:.3f}"),
           ("Memorized: alignment", "mem_alignment", "{:.3f}"), ("Control: alignment", "ctl_alignment", "{:.3f}"),
           ("Control: alignment loss vs none", "ctl_alignment_loss", "{:.1%}"),
           ("UNet forward / image", "forward_per_image", "{:.0f}"), ("UNet backward / image", "backward_per_image",
                                                                    "{:.0f}"),
           ("Seconds / image", "seconds_per_image", "{:.3f}"), ("Time vs none", "time_vs_none", "{:.2f}x"))


def cell(row: pd.Series, column: str, fmt: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = fmt.format(value)
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)):
        text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return text


@dataclass
class Leaderboard:
    board: pd.DataFrame
    markdown: str


def markdown_table(board: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, c, f) for _, c, f in COLUMNS) + " |" for _, row in board.iterrows()]
    return "\n".join(lines)


SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const table = th.closest("table"), body = table.tBodies[0];
  const up = th.dataset.order !== "asc";
  table.querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = up ? "asc" : "desc";
  const key = td => { const v = td.dataset.value; return v === "" ? NaN : (isNaN(+v) ? v : +v); };
  [...body.rows].sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    if (Number.isNaN(x) !== Number.isNaN(y)) return Number.isNaN(x) ? 1 : -1;  // empty cells last
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  }).forEach(r => body.appendChild(r));
}));
"""


def html_page(board: pd.DataFrame, points: pd.DataFrame, scenario: str, budget: float, timing: dict) -> str:
    """The leaderboard page: sortable by any column (a click; inline script, no network), the curves, every point."""
    def rows(frame: pd.DataFrame, columns: tuple) -> str:
        out = []
        for _, row in frame.iterrows():
            cells = []
            for _, c, f in columns:
                value = row.get(c)
                raw = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
                cells.append(f'<td data-value="{html.escape(str(raw))}">{html.escape(cell(row, c, f))}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>")
        return "\n".join(out)

    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    point_columns = (("Method", "method", "{}"), ("Point", "point", "{}"), ("Split", "split", "{}"),
                     *COLUMNS[2:6], ("Seconds / image", "seconds_per_image", "{:.3f}"))
    point_head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in point_columns)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>memguard compare: {html.escape(scenario)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} th{{cursor:pointer;background:#f4f4f4}}
th[data-order=asc]::after{{content:" \\25B2"}} th[data-order=desc]::after{{content:" \\25BC"}} td:first-child{{text-align:left}}</style>
</head><body>
<h1>Memorization mitigations on {html.escape(scenario)}</h1>
<p>Each method at its operating point: the point of its sweep with the lowest memorized similarity among those losing at
most {budget:.0%} of <code>none</code>'s control-prompt alignment, chosen on the calibration seeds and reported on the
held-out seeds (95% intervals, bootstrap over prompts). Click a column to sort. Compare took {timing.get('cpu_seconds')} s of
CPU ({timing.get('wall_seconds')} s wall) in the run that wrote this page.</p>
<table class="sortable" id="leaderboard"><thead><tr>{head}</tr></thead><tbody>
{rows(board, COLUMNS)}
</tbody></table>
<h2>Trade-off curves (held-out seeds)</h2>
<img src="tradeoff.png" alt="copies against alignment per method" style="max-width:100%">
<h2>Every point</h2>
<table class="sortable" id="points"><thead><tr>{point_head}</tr></thead><tbody>
{rows(points, point_columns)}
</tbody></table>
<script>{SORT_JS}</script>
</body></html>
"""


def plot_tradeoff(path: Path, points: pd.DataFrame, board: pd.DataFrame, budget: float) -> None:
    """Copies (similarity p95, copy fraction) against alignment (control, memorized prompts), one line per method
    through its points (held-out seeds) with intervals; the operating points ringed, the budget dashed."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    held = points[points.split == "held_out"]
    chosen = set(zip(board.method, board.point))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    floor = (1 - budget) * float(held[held.method == "none"].ctl_alignment.iloc[0])
    colours = plt.get_cmap("tab20")
    for (y, x), ax in zip([(y, x) for y in ("mem_sim_p95", "mem_copy_fraction")
                           for x in ("ctl_alignment", "mem_alignment")], axes.flat):
        for i, (method, group) in enumerate(held.groupby("method", sort=False)):
            colour = colours(i % 20)
            xerr = np.abs(np.vstack([group[x] - group[f"{x}_lo"], group[f"{x}_hi"] - group[x]])).astype(float)
            yerr = np.abs(np.vstack([group[y] - group[f"{y}_lo"], group[f"{y}_hi"] - group[y]])).astype(float)
            ax.errorbar(group[x], group[y], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), marker="o", ms=4,
                        lw=1, elinewidth=0.5, capsize=2, color=colour, label=method)
            for _, row in group.iterrows():
                if (method, row.point) in chosen:
                    ax.plot(row[x], row[y], "o", ms=11, mfc="none", mec=colour, mew=1.5)
        if x == "ctl_alignment":
            ax.axvline(floor, color="0.5", ls="--", lw=0.8)
        ax.set_xlabel({"ctl_alignment": "alignment, control prompts", "mem_alignment": "alignment, memorized prompts"}[x])
        ax.set_ylabel({"mem_sim_p95": "similarity p95, memorized prompts",
                       "mem_copy_fraction": "copy fraction, memorized prompts"}[y])
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"copies against alignment per method (held-out seeds); rings: operating points; dashed: "
                 f"{budget:.0%} control-alignment budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_leaderboard(output: Path, rows: list[dict[str, Any]], budget: float, scenario: str,
                      timing: dict[str, Any]) -> Leaderboard:
    """``points.csv``, ``leaderboard.csv``, ``.md``, ``.html`` and ``tradeoff.png`` in ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    points = pd.DataFrame(rows)
    board = operating_points(points, budget)
    points.to_csv(output / "points.csv", index=False)
    board.to_csv(output / "leaderboard.csv", index=False)
    markdown = markdown_table(board)
    (output / "leaderboard.md").write_text(
        f"# Memorization mitigations on {scenario}\n\nOperating points under a {budget:.0%} control-alignment budget, "
        f"chosen on the calibration seeds, reported on the held-out seeds (95% intervals over prompts). CPU "
        f"{timing.get('cpu_seconds')} s, wall {timing.get('wall_seconds')} s.\n\n{markdown}\n\n![trade-off curves](tradeoff.png)\n")
    plot_tradeoff(output / "tradeoff.png", points, board, budget)
    (output / "leaderboard.html").write_text(html_page(board, points, scenario, budget, timing))
    (output / "compare.json").write_text(json.dumps({"scenario": scenario, "budget": budget, **timing}, indent=2) + "\n")
    return Leaderboard(board, markdown)
