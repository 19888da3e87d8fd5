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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memguard.runs.report import write_table_report

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


def values(metrics: dict[str, Any], group: str | None = None) -> dict[str, Any]:
    """The table cells of one run (one prompt group where ``group`` is given), and what made them."""
    sim, align, fid = metrics.get("similarity"), metrics.get("alignment"), metrics.get("fid")
    if group is not None:
        sim = None if sim is None else {**sim, **sim.get("groups", {}).get(group, {})}
        align = None if align is None else {**align, **align.get("groups", {}).get(group, {})}
    out: dict[str, Any] = {}
    if sim is not None:
        out |= {SIM: round(sim["p95"], 4), MEAN_STD: f"{sim['mean']:.4f} ± {sim['std']:.2f}",
                "copy fraction": sim.get("copy_fraction"), "similarity by": sim["embedder"]}
    if align is not None:
        out |= {CLIP: round(align["mean"], 4), "alignment by": align["scorer"]}
    if fid is not None:
        out |= {FID: round(fid["value"], 2), "fid by": f"{fid['kind']}: {fid['features']}"}
    return out


def paper_table(table: Table, runs_dir: Path) -> pd.DataFrame:
    records = []
    for row in table.rows:
        metrics = read_metrics(runs_dir, table.scenario, row.mitigation)
        ours = values(metrics) if metrics else {}
        record: dict[str, Any] = {"Method": row.label}
        for column in table.columns:
            record[column] = ours.get(column)
            record[f"{column} [paper]"] = row.paper.get(column)
        record |= {k: ours.get(k) for k in ("similarity by", "alignment by", "fid by")}
        record["run"] = f"{table.scenario}/{row.mitigation}"
        record["command"] = "" if metrics else run_command(table.scenario, row)
        records.append(record)
    return pd.DataFrame(records)


TINY_ROWS = ("none", "uncond", "stp_t300", "stp_t500", "stp_t700", "og_stp_t500", "dtp", "og_dtp", "rand_word",
             "rand_numb", "wen_l3", "wen_l1", "ren")


def tiny_table(runs_dir: Path, scenario: str = "tiny") -> pd.DataFrame:
    """One row per (mitigation, prompt group) of every tiny run present, the table's rows first, then any other."""
    folder = runs_dir / scenario
    present = sorted(p.parent.name for p in folder.glob("*/metrics.json")) if folder.is_dir() else []
    order = [m for m in TINY_ROWS if m in present] + [m for m in present if m not in TINY_ROWS]
    records = []
    for mitigation in order:
        metrics = read_metrics(runs_dir, scenario, mitigation)
        groups = list(metrics.get("similarity", {}).get("groups", {})) or [None]
        transition = metrics.get("transition", {})
        for group in groups:
            cells = values(metrics, group)
            records.append({
                "Mitigation": mitigation, "Captions": group or "all", SIM: cells.get(SIM),
                MEAN_STD: cells.get(MEAN_STD), "Copy fraction": cells.get("copy fraction"),
                "Alignment": cells.get(CLIP), "FID-like": cells.get(FID),
                "never switched": transition.get("never_fired_fraction"),
                "similarity by": cells.get("similarity by"), "alignment by": cells.get("alignment by"),
                "fid by": cells.get("fid by"),
            })
    return pd.DataFrame(records)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub table (no dependency on ``tabulate``); empty cells for missing values."""
    def cell(v: Any) -> str:
        return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _short(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1] if target else ""


def run_protocol(run_dir: Path) -> str | None:
    """One line: the protocol a run folder's ``config.yaml`` (resolved) records, or None without one."""
    from omegaconf import OmegaConf

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
    parts.append(f"{get('sampler', 'name')} {get('sampler', 'steps')} steps, scale {get('guidance', 'scale')}")
    mitigation = get("mitigation") or {}
    for key in ("prompt", "embedding", "attention"):
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


def write_tables(output_dir: str | Path) -> list[Path]:
    """Write ``tables/table{1..5}.{csv,md,html}`` and ``tables/tiny.{csv,md,html}`` under ``output_dir``."""
    out = Path(output_dir)
    runs, tables = out / "runs", out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    frames = {f"table{t.number}": (paper_table(t, runs), f"Table {t.number} ({t.scenario})") for t in PAPER_TABLES}
    frames["tiny"] = (tiny_table(runs), "The tiny scenario (pixel similarity, attribute alignment: not SSCD/CLIP)")
    protocols = {f"table{t.number}": protocol_text(runs, t.scenario, [r.mitigation for r in t.rows]) for t in PAPER_TABLES}
    tiny = runs / "tiny"
    protocols["tiny"] = protocol_text(runs, "tiny", sorted(p.name for p in tiny.iterdir() if p.is_dir())
                                      if tiny.is_dir() else [])
    written = []
    for name, (frame, title) in frames.items():
        frame.to_csv(tables / f"{name}.csv", index=False)
        protocol = f"\n{protocols[name]}" if protocols[name] else ""
        (tables / f"{name}.md").write_text(f"## {title}\n\n{to_markdown(frame)}{protocol}")
        written += [tables / f"{name}.csv", tables / f"{name}.md", write_table_report(tables, name, title, frame, protocols[name])]
    return written
