"""``memguard tables``: the paper's Tables 1-5 and the tiny scenario's table, from run folders' ``metrics.json``.

Each paper table has the paper's rows and columns; beside every column of ours stands the paper's published
value (``... [paper]``). A row whose run folder is missing stays empty and its ``command`` says how to make it.
Each row also names the networks behind its numbers (``similarity by``, ``alignment by``, ``fid by``), so a
pixel-space or attribute-classifier number is never read as SSCD, CLIP or Inception. Under each table's Markdown
stands the protocol each run folder ran with (from its ``config.yaml``): images per prompt, prompt draw, sampler,
steps, scale, the baselines' settings and the metric networks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from memguard.metrics.bootstrap import Above, Percentile, difference_interval
from memguard.mitigations import SLOTS
from memguard.runs.plots import plot_tradeoff
from memguard.runs.report import write_table_report, write_tables_index
from memguard.runs.summary import (
    group_names,
    interval_note,
    measured_with,
    networks,
    section,
    sig,
    with_interval,
)

SIM, MEAN_STD, CLIP, FID = "Similarity (95pc)", "Mean ± Std", "CLIP Score", "FID"


@dataclass(frozen=True)
class Row:
    label: str
    mitigation: str  # the run folder's name under runs/<scenario>/ (the mitigation's ``name``)
    paper: dict[str, Any] = field(default_factory=dict)
    overrides: str = ""  # extra `memguard run` arguments that make this row's run


@dataclass(frozen=True)
class Table:
    number: int
    scenario: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


def _rows(columns: tuple[str, ...], spec: list[tuple[str, str, tuple, str]]) -> tuple[Row, ...]:
    return tuple(Row(label, mit, dict(zip(columns, values)), extra) for label, mit, values, extra in spec)


_T1 = (SIM, CLIP, FID)
_T3 = (SIM, MEAN_STD, CLIP, FID)
# The paper's published values (Jain et al., CVPR 2025, Tables 1-5). Table 1 does not state Wen et al.'s l_target;
# memguard runs it with l_target = 1.
PAPER_TABLES = (
    Table(1, "laion10k", _T1, _rows(_T1, [
        ("No mitigation", "none", (0.6504, 0.3027, 16.8373), ""),
        ("Add rand word", "rand_word", (0.5254, 0.2941, 17.4142), ""),
        ("Add rand numb", "rand_numb", (0.5416, 0.2993, 17.0245), ""),
        ("Wen et al.", "wen_l1", (0.3853, 0.2895, 16.7176), ""),
        ("Ren et al.", "ren", (0.6028, 0.2959, 20.2931), ""),
        ("Ours (STP)", "stp_t500", (0.2857, 0.2976, 19.8494), "mitigation.schedule.tau=500"),
        ("Ours (OG + STP)", "og_stp_t500", (0.3811, 0.3020, 15.6679), "mitigation.schedule.tau=500"),
    ])),
    Table(2, "imagenette", (SIM, FID), _rows((SIM, FID), [
        ("No mitigation", "none", (0.3702, 43.35), ""),
        ("CFG=7.5 [700,0]", "interval_700_0", (0.3018, 38.86), "mitigation.schedule.t_hi=700"),
        ("CFG=7.5 [600,0]", "interval_600_0", (0.2756, 45.73), "mitigation.schedule.t_hi=600"),
    ])),
    Table(3, "wen_dup200", _T3, _rows(_T3, [
        ("No mitigation", "none", (0.7977, "0.5513 ± 0.16", 0.3105, 106.49), ""),
        ("Add rand word", "rand_word", (0.7480, "0.4312 ± 0.21", 0.3071, 116.92), ""),
        ("Add rand numb", "rand_numb", (0.7366, "0.3850 ± 0.21", 0.3027, 126.54), ""),
        ("Wen et al. (l_target=3)", "wen_l3", (0.7747, "0.5147 ± 0.17", 0.3100, 109.28), ""),
        ("Wen et al. (l_target=1)", "wen_l1", (0.6038, "0.2808 ± 0.16", 0.3050, 136.34), ""),
        ("Ren et al.", "ren", (0.6881, "0.4036 ± 0.16", 0.3066, 124.38), ""),
        ("Ours (DTP)", "dtp", (0.5885, "0.2866 ± 0.16", 0.3020, 138.92), ""),
        ("Ours (OG + DTP)", "og_dtp", (0.6915, "0.2844 ± 0.20", 0.2910, 140.05), ""),
    ])),
    Table(4, "webster500", _T3, _rows(_T3, [
        ("No mitigation", "none", (0.9262, "0.5508 ± 0.31", 0.3144, 155.35), ""),
        ("Add rand word", "rand_word", (0.9049, "0.3779 ± 0.29", 0.3046, 143.10), ""),
        ("Add rand numb", "rand_numb", (0.8934, "0.3740 ± 0.28", 0.3068, 146.01), ""),
        ("Wen et al. (l_target=3)", "wen_l3", (0.9155, "0.4913 ± 0.31", 0.3134, 154.70), ""),
        ("Wen et al. (l_target=1)", "wen_l1", (0.9011, "0.3287 ± 0.27", 0.3088, 147.74), ""),
        ("Ren et al.", "ren", (0.6718, "0.2544 ± 0.18", 0.3110, 148.93), ""),
        ("Ours (DTP)", "dtp", (0.8722, "0.3001 ± 0.25", 0.2897, 169.67), ""),
        ("Ours (OG + DTP)", "og_dtp", (0.8680, "0.2611 ± 0.24", 0.2873, 155.41), ""),
    ])),
    Table(5, "laion100k", _T1, _rows(_T1, [
        ("No mitigation", "none", (0.3952, 0.314, 11.46), ""),
        ("Ours (STP)", "stp_t500", (0.2861, 0.309, 16.06), "mitigation.schedule.tau=500"),
    ])),
)


def read_metrics(runs_dir: Path, scenario: str, mitigation: str) -> dict[str, Any] | None:
    path = runs_dir / scenario / mitigation / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _mitigation_option(name: str) -> str:
    """The config option behind a run name: stp_t500 -> stp, interval_700_0 -> interval."""
    for prefix in ("og_stp", "stp", "interval"):
        if name.startswith(prefix + "_"):
            return prefix
    return name


def run_command(scenario: str, row: Row, metrics: str = "paper") -> str:
    extra = f" {row.overrides}" if row.overrides else ""
    return f"memguard run scenario={scenario} mitigation={_mitigation_option(row.mitigation)} metrics={metrics}{extra}"


MEAN, STD, COPIES = "Similarity mean", "Similarity std", "Copy fraction"
NETWORK_COLUMNS = ("similarity by", "alignment by", "fid by")
# The prompt group a mitigation should leave alone (the first of these a run has): the paper scenarios' control
# prompts, or the tiny scenario's captions of unique training images.
CONTROL_GROUPS = ("unmemorized", "unique")


def _put(out: dict[str, Any], column: str, entry: dict[str, Any] | None, key: str, interval: bool = True) -> None:
    """``out[column]`` (and ``column_lo`` / ``column_hi``) from ``entry[key]`` (``key_lo`` / ``key_hi``)."""
    entry = entry or {}
    out[column] = entry.get(key)
    if interval:
        out[f"{column}_lo"], out[f"{column}_hi"] = entry.get(f"{key}_lo"), entry.get(f"{key}_hi")


def values(metrics: dict[str, Any], group: str | None = None, whole_run_fid: bool = True) -> dict[str, Any]:
    """The table cells of one run (one prompt group where ``group`` is given) at full precision, each with its
    interval (``<column>_lo`` / ``_hi``, empty for folders evaluated before intervals), and what made them. A group
    gets the run's FID where the FID stage gave none per group, unless ``whole_run_fid`` is false."""
    sim, align, fid = (section(metrics, k, group) for k in ("similarity", "alignment", "fid"))
    if group is not None and not whole_run_fid and "groups" not in (metrics.get("fid") or {}):
        fid = None
    out: dict[str, Any] = {}
    if sim is not None:
        _put(out, SIM, sim, "p95")
        _put(out, MEAN, sim, "mean")
        _put(out, STD, sim, "std", interval=False)
        _put(out, COPIES, sim, "copy_fraction")
        out["similarity by"] = sim.get("embedder")
    if align is not None:
        _put(out, CLIP, align, "mean")
        out["alignment by"] = align.get("scorer")
    if fid is not None:
        _put(out, FID, fid, "value", interval="value_lo" in fid)
        out["fid by"] = f"{fid.get('kind')}: {fid.get('features')}"
    for column, name, key in OPTIONAL_COLUMNS:
        entry = section(metrics, name, group)
        if entry is not None and (group is None or "groups" in (metrics.get(name) or {})):
            _put(out, column, entry, key)
    return out


# The optional columns (metrics=paper_plus, +extra_metrics=...): column, metrics.json section, key. A table shows
# one only where a run has it.
OPTIONAL_COLUMNS = (("DINO copy fraction", "dino", "copy_fraction"), ("DINO similarity (95pc)", "dino", "p95"),
                    ("Aesthetic", "aesthetic", "mean"), ("LPIPS diversity", "diversity", "mean"))


def optional_columns(records: list[dict[str, Any]], cells: list[dict[str, Any]]) -> None:
    """Add each optional column (value, ``_lo``, ``_hi``) to ``records`` (one per ``cells``) where any has it."""
    for column, _, _ in OPTIONAL_COLUMNS:
        if any(c.get(column) is not None for c in cells):
            for record, c in zip(records, cells):
                record |= {k: c.get(k) for k in (column, f"{column}_lo", f"{column}_hi")}


def _columns(column: str) -> list[str]:
    """The CSV columns of one of a table's columns: the value, its interval, the paper's value."""
    if column == MEAN_STD:
        return [MEAN, f"{MEAN}_lo", f"{MEAN}_hi", STD, f"{MEAN_STD} [paper]"]
    return [column] + ([f"{column}_lo", f"{column}_hi"] if column != FID else []) + [f"{column} [paper]"]


def paper_table(table: Table, runs_dir: Path) -> pd.DataFrame:
    """One row per paper row (``Prompts`` = ``all``, the paper's value beside ours) and, where its run has prompt
    groups, one more row per group."""
    records, cells = [], []
    for row in table.rows:
        metrics = read_metrics(runs_dir, table.scenario, row.mitigation)
        for group in [None, *(group_names(metrics) if metrics else [])]:
            ours = values(metrics, group, whole_run_fid=False) if metrics else {}
            cells.append(ours)
            record: dict[str, Any] = {"Method": row.label, "Prompts": group or "all"}
            for column in table.columns:
                for name in _columns(column):
                    record[name] = (row.paper.get(column) if group is None else None) if name.endswith("[paper]") \
                        else ours.get(name)
            record |= {k: ours.get(k) for k in NETWORK_COLUMNS}
            record["run"] = f"{table.scenario}/{row.mitigation}"
            record["command"] = "" if metrics else run_command(table.scenario, row)
            records.append(record)
    optional_columns(records, cells)
    return pd.DataFrame(records)


TINY_ROWS = ("none", "uncond", "stp_t300", "stp_t500", "stp_t700", "og_stp_t500", "dtp", "og_dtp", "auto",
             "rand_word", "rand_numb", "wen_l3", "wen_l1", "ren", "han", "sail", "prss", "nemo")
TINY_COLUMNS = ("Mitigation", "Captions", SIM, f"{SIM}_lo", f"{SIM}_hi", MEAN, f"{MEAN}_lo", f"{MEAN}_hi", STD,
                COPIES, f"{COPIES}_lo", f"{COPIES}_hi", "Alignment", "Alignment_lo", "Alignment_hi", "FID-like",
                "never switched", "never switched_lo", "never switched_hi", *NETWORK_COLUMNS)


# the miniatures' tables (pixel similarity, attribute alignment): tiny's always, tiny2's where it has runs
MINIATURES = {"tiny": "The tiny scenario (pixel similarity, attribute alignment: not SSCD/CLIP)",
              "tiny2": "The second miniature, tiny2 (pixel similarity of 4x4 block means, pattern and ink "
                       "alignment: not SSCD/CLIP)"}


def tiny_runs(runs_dir: Path, scenario: str = "tiny") -> list[str]:
    """The tiny run folders present: the table's rows first, then any other."""
    folder = runs_dir / scenario
    present = sorted(p.parent.name for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    return [m for m in TINY_ROWS if m in present] + [m for m in present if m not in TINY_ROWS]


def tiny_table(runs_dir: Path, scenario: str = "tiny") -> pd.DataFrame:
    """One row per (mitigation, prompt group) of every tiny run present, the table's rows first, then any other.
    A group's row carries the run's FID-like distance (over all its images) where there is none per group."""
    records, every = [], []
    for mitigation in tiny_runs(runs_dir, scenario):
        metrics = read_metrics(runs_dir, scenario, mitigation)
        transition = metrics.get("transition", {})
        for group in group_names(metrics) or [None]:
            cells = values(metrics, group)
            every.append(cells)
            record = {"Mitigation": mitigation, "Captions": group or "all", "run": f"{scenario}/{mitigation}"}
            for column in TINY_COLUMNS[2:]:
                base, suffix = (column[:-3], column[-3:]) if column.endswith(("_lo", "_hi")) else (column, "")
                record[column] = (transition.get(f"never_fired_fraction{suffix}") if base == "never switched"
                                  else cells.get({"Alignment": CLIP, "FID-like": FID}.get(base, base) + suffix))
            records.append(record)
    optional_columns(records, every)
    extra = [c for c in (records[0] if records else {}) if c not in TINY_COLUMNS and c != "run"]
    return pd.DataFrame(records, columns=[*TINY_COLUMNS, *extra, "run"])


def display(frame: pd.DataFrame) -> pd.DataFrame:
    """A table for people, from the CSV's: each number to 3 significant digits with its interval
    (``0.512 [0.491, 0.533]``), ``Mean ± Std`` from the similarity mean (with its interval) and std, the paper's
    values as published; the networks, stated once under the table (:func:`notes`), and the intervals' own
    columns left out, as is the ``Prompts`` column of a table without groups."""
    def text(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)

    out: dict[str, list[str]] = {}
    rows = frame.to_dict("records")
    for column in frame.columns:
        if column.endswith(("_lo", "_hi")) or column in NETWORK_COLUMNS or column == STD:
            continue
        if column == "Prompts" and set(frame[column]) <= {"all"}:
            continue
        if column == MEAN:
            out[MEAN_STD] = [with_interval(r[MEAN], r.get(f"{MEAN}_lo"), r.get(f"{MEAN}_hi"))
                             + (f" ± {sig(r[STD], 2)}" if sig(r.get(STD)) else "") if sig(r[MEAN]) else "" for r in rows]
        elif f"{column}_lo" in frame:
            out[column] = [with_interval(r[column], r[f"{column}_lo"], r[f"{column}_hi"]) for r in rows]
        elif column.endswith("[paper]"):
            out[column] = [text(r[column]) for r in rows]
        elif pd.api.types.is_numeric_dtype(frame[column]):
            out[column] = [sig(r[column]) for r in rows]
        else:
            out[column] = [text(r[column]) for r in rows]
    return pd.DataFrame(out)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (no dependency on ``tabulate``); empty cells for missing values."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _generations(runs_dir: Path, run: str) -> pd.DataFrame | None:
    path = runs_dir / run / "generations.csv"
    return pd.read_csv(path) if path.is_file() else None


def cost_table(runs_dir: Path, scenario: str, rows: list[tuple[str, str]]) -> tuple[pd.DataFrame, str] | None:
    """What each mitigation removes from the memorized prompts and what it costs the control prompts (the first
    of :data:`CONTROL_GROUPS` the ``none`` run has), each against the ``none`` run of the same scenario, on the
    same prompts: ``Copies removed`` = none's copy fraction (similarity p95 where no copy threshold) on every
    other group's prompts minus the mitigation's; ``Alignment lost`` = none's mean alignment on the control
    prompts minus the mitigation's; ``FID added`` = the mitigation's FID on the control prompts minus none's (where
    the FID stage gave one per group). Intervals: paired bootstrap over prompts, from each run's
    ``generations.csv``. ``rows``: (label, run folder name). None without a control group or a ``none`` run;
    else the table and a sentence saying what was compared."""
    base_metrics = read_metrics(runs_dir, scenario, "none")
    base = _generations(runs_dir, f"{scenario}/none")
    if base_metrics is None or base is None or "group" not in base:
        return None
    groups = [str(g) for g in dict.fromkeys(base.group.dropna())]
    control = next((g for g in CONTROL_GROUPS if g in groups), None)
    if control is None:
        return None
    memorized = [g for g in groups if g != control]
    threshold = (base_metrics.get("similarity") or {}).get("copy_threshold")
    statistic = Above(threshold) if threshold is not None else Percentile(95)
    copies = "copy fraction" if threshold is not None else "similarity p95"

    def measure(values: Any, stat: Any) -> float:
        x = pd.to_numeric(pd.Series(values), errors="coerce").dropna().to_numpy()
        return math.nan if not len(x) else float((x > stat.threshold).mean()) if isinstance(stat, Above) \
            else float(np.percentile(x, stat.q)) if isinstance(stat, Percentile) else float(x.mean())

    def delta(column: str, rows_base: pd.DataFrame, rows_run: pd.DataFrame, stat: Any) -> list[float | None]:
        if column not in rows_base or column not in rows_run or rows_run.empty:
            return [None, None, None]
        a, b = rows_base[column].to_numpy(dtype=float), rows_run[column].to_numpy(dtype=float)
        lo, hi = difference_interval(a, rows_base.prompt_idx, b, rows_run.prompt_idx, stat)
        point = measure(a, stat) - measure(b, stat)
        return [point, None if math.isnan(lo) else lo, None if math.isnan(hi) else hi]

    records = []
    for label, mitigation in rows:
        gens, metrics = _generations(runs_dir, f"{scenario}/{mitigation}"), read_metrics(runs_dir, scenario, mitigation)
        if mitigation == "none" or gens is None or metrics is None or "group" not in gens:
            continue
        gens = gens.assign(group=gens.group.astype(str))
        base_mem, run_mem = base[base.group.astype(str).isin(memorized)], gens[gens.group.isin(memorized)]
        base_ctl, run_ctl = base[base.group.astype(str) == control], gens[gens.group == control]
        record: dict[str, Any] = {"Mitigation": label}
        record |= dict(zip(("Copies removed", "Copies removed_lo", "Copies removed_hi"),
                           delta("similarity", base_mem, run_mem, statistic)))
        lost = delta("alignment", base_ctl, run_ctl, "mean")
        record |= dict(zip(("Alignment lost", "Alignment lost_lo", "Alignment lost_hi"), lost))
        fid_run, fid_base = (((m.get("fid") or {}).get("groups") or {}).get(control, {}).get("value")
                             for m in (metrics, base_metrics))
        record["FID added"] = fid_run - fid_base if fid_run is not None and fid_base is not None else None
        record["run"] = f"{scenario}/{mitigation}"
        records.append(record)
    if not records:
        return None
    frame = pd.DataFrame(records)
    if frame["FID added"].isna().all():
        frame = frame.drop(columns=["FID added"])
    note = (f"Against `{scenario}/none` on the same prompts. Copies removed: its {copies} on the memorized prompts "
            f"(groups {', '.join(memorized)}) minus the mitigation's (more is better); alignment lost: its mean "
            f"alignment on the `{control}` prompts minus the mitigation's"
            + ("; FID added: the mitigation's FID on them minus its" if "FID added" in frame else "")
            + " (less is better). Intervals: paired bootstrap over prompts.")
    return frame, note


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def run_protocol(run_dir: Path) -> str | None:
    """One line: the protocol a run folder's ``config.yaml`` (resolved) records, or None without one."""

    file = run_dir / "config.yaml"
    if not file.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    get = lambda *keys: _dig(cfg, keys)
    seeds = get("seeds")
    images = len(seeds) if isinstance(seeds, list) else 1 if isinstance(seeds, int) else get("images_per_prompt")
    draw = get("prompt_draw")
    parts = [f"{images} image(s)/prompt" + (", seeds per prompt" if get("seed_scheme") == "per_prompt" else "")]
    if draw:
        parts.append(f"prompts drawn: {draw.get('count')} (seed {draw.get('seed')}, "
                     f"{'with' if draw.get('replace', True) else 'without'} replacement)")
    parts.append(f"{get('sampler', 'name')} {get('sampler', 'steps')} steps, scale {get('guidance', 'scale')}"
                 + (f", {get('dtype')}" if get("dtype") not in (None, "float32") else "")
                 + (f" (protocol {get('protocol', 'name')})" if get("protocol", "name") else ""))
    mitigation = get("mitigation") or {}
    for key in SLOTS:
        spec = mitigation.get(key)
        if spec:
            args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "_target_")
            parts.append(f"{_short(spec.get('_target_'))}({args})")
    metrics = get("metrics") or {}
    nets = [f"{name}: {_short((metrics.get(name) or {}).get('_target_'))}"
            + (f" {metrics[name]['model']}" if (metrics.get(name) or {}).get("model") else "")
            for name in ("similarity", "alignment", "fid") if metrics.get(name)]
    parts.append(f"metrics {metrics.get('name')} ({'; '.join(nets) or 'none'})")
    return "; ".join(parts)


def _dig(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def protocol_text(runs_dir: Path, scenario: str, mitigations: list[str]) -> str:
    """Under a table: per run folder present, the protocol it ran with."""
    lines = [f"- `{scenario}/{m}`: {text}" for m in mitigations
             if (text := run_protocol(runs_dir / scenario / m)) is not None]
    return "Protocol (from each run folder's config.yaml):\n\n" + "\n".join(lines) + "\n" if lines else ""


@dataclass
class Laid:
    """One table as ``memguard tables`` writes it: the CSV's frame, the displayed frame, the notes under it,
    the cost table, the trade-off figure's file and points (None: no figure) and the protocol."""

    name: str
    title: str
    frame: pd.DataFrame
    shown: pd.DataFrame
    notes: list[str]
    cost: tuple[pd.DataFrame, str] | None
    figure: str | None
    points: list[dict] | None
    protocol: str
    present: int  # run folders present

    @property
    def runs(self) -> list[str]:
        return [r for r in dict.fromkeys(self.frame["run"])] if "run" in self.frame else []


def notes(runs: dict[str, dict[str, Any]], whole_run_fid: bool) -> list[str]:
    """Under a table: what every column was measured with (once) and how its intervals were computed."""
    if not runs:
        return []
    lines = [f"Measured with: {'; '.join(measured_with(runs))}.", interval_note(next(iter(runs.values()))) + "."]
    if whole_run_fid and any("groups" not in (m.get("fid") or {"groups": 0}) for m in runs.values()):
        lines.append("FID-like: over all of a run's images, given on each of its groups' rows.")
    coverage = {run: (m.get("similarity") or {}).get("reference_coverage") for run, m in runs.items()}
    if any(coverage.values()):  # each prompt scored against its own references: how many had any
        texts = {run: f"{c['with']} of {c['of']} prompts have references" for run, c in coverage.items() if c}
        short = any(c["with"] < c["of"] for c in coverage.values() if c)
        lines.append("Similarity: " + (next(iter(texts.values())) if len(set(texts.values())) == 1 else
                                       "; ".join(f"{run}: {t}" for run, t in texts.items()))
                     + (" (the others are left out of it)." if short else "."))
    return lines


def _network_name(text: str | None) -> str:
    """A network's name without its details: ``clip[ViT-g-14, ViT-g-14.bin]`` -> ``clip[ViT-g-14]``."""
    return re.sub(r",[^\]]*\]", "]", (text or "?").split(" (")[0])


def lay_out(name: str, title: str, frame: pd.DataFrame, scenario: str, rows: list[tuple[str, str]], tables: Path,
            runs_dir: Path, protocol: str, tiny: bool = False) -> Laid:
    """A table with its notes, cost table and trade-off figure (written to ``tables``)."""
    present = {m: metrics for _, m in rows if (metrics := read_metrics(runs_dir, scenario, m)) is not None}
    copies = COPIES if COPIES in frame and frame[COPIES].notna().any() else SIM
    by = networks(next(iter(present.values()), {}))
    points = plot_tradeoff(
        frame, tables / f"{name}_tradeoff.png", title, copies, "Alignment" if tiny else CLIP,
        "Mitigation" if tiny else "Method", "Captions" if tiny else "Prompts", "run",
        f"{'copy fraction' if copies == COPIES else 'similarity p95'} ({_network_name(by.get('similarity'))})",
        f"alignment ({_network_name(by.get('alignment'))})")
    if not points:
        (tables / f"{name}_tradeoff.png").unlink(missing_ok=True)  # a figure of runs since removed
    shown = display(frame.drop(columns=["run"]) if tiny else frame)
    return Laid(name, title, frame, shown, notes(present, tiny), cost_table(runs_dir, scenario, rows),
                f"{name}_tradeoff.png" if points else None, points, protocol, len(present))


def markdown(laid: Laid) -> str:
    """A table's Markdown: the table, the notes, the cost table, the trade-off figure, the protocol."""
    parts = [f"## {laid.title}\n", to_markdown(laid.shown)]
    parts += ["\n".join(f"- {n}" for n in laid.notes) + "\n"] if laid.notes else []
    if laid.cost is not None:
        parts += [f"What each mitigation removes and costs. {laid.cost[1]}\n", to_markdown(display(laid.cost[0]))]
    if laid.figure:
        parts.append(f"![copies against alignment]({laid.figure})\n")
    if laid.protocol:
        parts.append(laid.protocol)
    return "\n".join(parts)


def write_tables(output_dir: str | Path) -> list[Path]:
    """Write under ``output_dir/tables``: ``table{1..5}``, ``tiny`` and (where it has runs) ``tiny2``, each as
    ``.csv`` (full precision, ``_lo`` / ``_hi`` columns), ``.md`` and ``.html`` (3 significant digits with
    intervals, the networks stated once under the table), ``_cost.csv`` where a control group exists,
    ``_tradeoff.png`` where runs with similarity and alignment exist; and ``report.html``, every table with its
    figure on one page."""
    out = Path(output_dir)
    runs, tables = out / "runs", out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    laid = []
    for t in PAPER_TABLES:
        rows = [(r.label, r.mitigation) for r in t.rows]
        laid.append(lay_out(f"table{t.number}", f"Table {t.number} ({t.scenario})", paper_table(t, runs), t.scenario,
                            rows, tables, runs, protocol_text(runs, t.scenario, [m for _, m in rows])))
    for scenario, title in MINIATURES.items():
        present = tiny_runs(runs, scenario)
        if scenario != "tiny" and not present:
            continue  # the second miniature's table only once it has runs
        folder = runs / scenario
        folders = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        laid.append(lay_out(scenario, title, tiny_table(runs, scenario), scenario, [(m, m) for m in present], tables,
                            runs, protocol_text(runs, scenario, folders), tiny=True))
    written = []
    for table in laid:
        table.frame.to_csv(tables / f"{table.name}.csv", index=False)
        (tables / f"{table.name}.md").write_text(markdown(table))
        written += [tables / f"{table.name}.csv", tables / f"{table.name}.md"]
        if table.cost is not None:
            table.cost[0].to_csv(tables / f"{table.name}_cost.csv", index=False)
            written.append(tables / f"{table.name}_cost.csv")
        else:
            (tables / f"{table.name}_cost.csv").unlink(missing_ok=True)
        written += [tables / table.figure] if table.figure else []
        written.append(write_table_report(tables, table.name, table.title, table_html(table), table.runs))
    written.append(write_tables_index(tables, [(t.name, t.title, table_html(t), t.present > 0) for t in laid]))
    return written


def table_html(laid: Laid) -> dict[str, Any]:
    """The parts of a table's HTML: the displayed frame, notes, cost table and note, figure, protocol."""
    return {"table": laid.shown, "notes": laid.notes, "cost": None if laid.cost is None else
            (display(laid.cost[0]), laid.cost[1]), "figure": laid.figure, "protocol": laid.protocol}
