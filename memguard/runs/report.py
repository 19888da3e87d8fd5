"""Figures people look at: the labelled ``grid.png`` and ``report.html`` of a run folder, and one HTML page per
table of ``memguard tables``.

Every link in a page is relative (``images/...``, ``grid.png``, ``../runs/...``), so a folder can be copied or
served as it is. The grid's rows are prompts (index, group and text at the left), its first column the nearest
reference image of the row's images (where the similarity stage ran and the references are still there), its
other columns the row's images by seed (the same seeds in every row unless ``seed_scheme=per_prompt``); an
image scored a copy is outlined in red.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf
from PIL import Image

from memguard.metrics.agreement import verdicts
from memguard.runs.plots import set_margins
from memguard.runs.summary import interval_note, measured_with, run_summary, with_interval

NUMBER_CELL = re.compile(r"^-?\d[\d.]* \[")
# Figures of a run folder, in the order the report shows them: file, caption.
FIGURES = (
    ("grid.png", "Generations: rows are prompts, columns their images by seed; first column the nearest reference image; "
                 "red outline: a copy"),
    ("d_curves.png", "d_t = ||eps_c - eps_u||^2 and the guidance scale s per step, every image; |: transition"),
    ("norms.png", "Mean ||eps_c||, ||eps_u||, ||eps_c - eps_u|| per timestep and group (the paper's Figures 3, 9, 10, 12)"),
    ("roc.png", "Memorization detection from the trajectory: ROC curves"),
    ("agreement.png", "Where the copy detectors disagree: each image one calls a copy and the other not, beside the "
                      "similarity embedder's and DINO's nearest references, with both scores"),
    ("basin.png", "Attraction basin strips"),
)


def copy_threshold(metrics: dict[str, Any]) -> float | None:
    sim = metrics.get("similarity") or {}
    return sim.get("copy_threshold") if sim.get("copy_threshold") is not None else sim.get("threshold")


def _reference_root(run_dir: Path) -> Path | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    references = OmegaConf.load(config).get("references")
    return Path(str(references)).expanduser() if references else None


def write_grid(run_dir: Path, max_rows: int = 8, max_cols: int = 8) -> Path:
    """``grid.png`` from ``generations.csv`` (and ``metrics.json``'s copy threshold when evaluated)."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above
    from matplotlib.patches import Rectangle  # start-up: as above

    gens = pd.read_csv(run_dir / "generations.csv")
    metrics_file = run_dir / "metrics.json"
    threshold = copy_threshold(json.loads(metrics_file.read_text())) if metrics_file.is_file() else None
    root = _reference_root(run_dir)
    prompts = list(dict.fromkeys(gens.prompt_idx))[:max_rows]
    # column c: each prompt's c-th image; its seed is the same for every prompt unless seed_scheme=per_prompt
    by_prompt = {idx: gens[gens.prompt_idx == idx].set_index("seed") for idx in prompts}
    n_images = min(max_cols, max(len(rows) for rows in by_prompt.values()))
    column_seeds = [{rows.index[c] for rows in by_prompt.values() if c < len(rows)} for c in range(n_images)]
    shared = all(len(seeds) == 1 for seeds in column_seeds)
    with_reference = "nearest_reference" in gens and root is not None and root.is_dir()
    cols = n_images + with_reference
    fig, axes = plt.subplots(len(prompts), cols, figsize=(0.9 * cols + 2.4, 0.9 * len(prompts) + 0.3), squeeze=False)
    for r, idx in enumerate(prompts):
        rows = by_prompt[idx]
        first = rows.iloc[0]
        group = "" if pd.isna(first.get("group")) else f" [{first['group']}]"
        text = str(first.prompt)
        axes[r][0].set_ylabel(f"#{idx}{group}\n{text[:38] + '…' if len(text) > 39 else text}", rotation=0,
                              ha="right", va="center", fontsize=7)
        if with_reference:
            scored = "similarity" in rows and rows.similarity.notna().any()  # not: a prompt without references
            nearest = rows.loc[rows.similarity.idxmax(), "nearest_reference"] if scored else None
            path = root / str(nearest) if nearest is not None and not pd.isna(nearest) and str(nearest) else None
            if path is not None and path.is_file():
                axes[r][0].imshow(Image.open(path).convert("RGB"), interpolation="nearest")
            if r == 0:
                axes[r][0].set_title("nearest\nreference", fontsize=7)
        for c in range(n_images):
            ax = axes[r][c + int(with_reference)]
            if c < len(rows):
                row = rows.iloc[c]
                ax.imshow(Image.open(run_dir / row["file"]).convert("RGB"), interpolation="nearest")
                is_copy = threshold is not None and "similarity" in rows and row["similarity"] > threshold
                if is_copy:
                    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, ec="red", lw=3))
                if not shared:
                    ax.set_xlabel(f"seed {rows.index[c]}", fontsize=6)
            if r == 0:
                ax.set_title(f"seed {next(iter(column_seeds[c]))}" if shared else f"image {c + 1}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    set_margins(fig, left=2.3, right=0.05, top=0.3 + 0.1 * (not shared), bottom=0.05 + 0.15 * (not shared),
                wgap=0.05, hgap=0.05 + 0.15 * (not shared))  # left: a label of 39 characters at 7 pt
    path = run_dir / "grid.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def disagreements(run_dir: Path) -> pd.DataFrame | None:
    """The images the similarity embedder (SSCD) calls a copy and DINO not, or the reverse
    (memguard.metrics.agreement), most confident first; None where the run has not both scores."""
    metrics_file, gens_file = run_dir / "metrics.json", run_dir / "generations.csv"
    if not metrics_file.is_file() or not gens_file.is_file():
        return None
    section = json.loads(metrics_file.read_text()).get("agreement")
    gens = pd.read_csv(gens_file)
    if not section or "dino_similarity" not in gens or "similarity" not in gens:
        return None
    v = verdicts(gens, section["similarity_threshold"], section["dino_threshold"])
    v = v[v.disagree].assign(margin=lambda f: (f.similarity - section["similarity_threshold"]).abs()
                             + (f.dino_similarity - section["dino_threshold"]).abs())
    return v.sort_values("margin", ascending=False)


def write_agreement(run_dir: Path, max_rows: int = 8) -> Path | None:
    """``agreement.png``: per disagreeing image (at most ``max_rows``) the image, the similarity embedder's
    nearest reference and DINO's, with both scores and verdicts; removed (None) where they agree on every image."""
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    path = run_dir / "agreement.png"
    rows = disagreements(run_dir)
    root = _reference_root(run_dir)
    if rows is None or rows.empty:
        path.unlink(missing_ok=True)
        return None
    rows = rows.head(max_rows)
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.1 * len(rows)), squeeze=False)
    for r, row in enumerate(rows.itertuples()):
        cells = [(run_dir / row.file, f"#{row.prompt_idx} seed {row.seed}\n"
                  f"{'similarity says copy' if row.similarity_copy else 'DINO says copy'}"),
                 (root / str(row.nearest_reference) if root else None, f"similarity nearest\n{row.similarity:.3f}"),
                 (root / str(row.dino_nearest_reference) if root else None, f"DINO nearest\n{row.dino_similarity:.3f}")]
        for ax, (file, title) in zip(axes[r], cells):
            if file is not None and file.is_file():
                ax.imshow(Image.open(file).convert("RGB"), interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def agreement_html(metrics: dict[str, Any], run_dir: Path) -> str:
    """The agreement counts and the table of the images the detectors disagree on (thumbnails), or nothing."""
    section = metrics.get("agreement")
    rows = disagreements(run_dir)
    if not section or rows is None:
        return ""
    kappa = section.get("kappa")
    text = (f"similarity by {section.get('similarity_by')} (copy: > {section['similarity_threshold']:g}) and "
            f"{section.get('dino_by')} (copy: > {section['dino_threshold']:g}) on {section['images']} images: both copy "
            f"{section['both_copy']}, similarity only {section['similarity_only']}, DINO only {section['dino_only']}, "
            f"neither {section['neither']}; Cohen's kappa {'n/a' if kappa is None else f'{kappa:.2f}'}.")
    parts = ["<h2 id='agreement'>Copy detectors</h2>", f"<p class='note'>{html.escape(text)}</p>"]
    if not rows.empty:
        shown = rows.assign(image=rows.file, says=rows.similarity_copy.map({True: "similarity: copy",
                                                                            False: "DINO: copy"}))
        columns = ["image", "says", "prompt_idx", "seed", "prompt", "similarity", "nearest_reference",
                   "dino_similarity", "dino_nearest_reference"]
        parts.append(_table(shown[[c for c in columns if c in shown]], {"image": ""}))
    return "\n".join(parts)


def _metrics_rows(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _metrics_rows(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), value)]


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:1.5em;max-width:1500px} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left} img.thumb{width:48px;image-rendering:pixelated}"
             "figure{margin:1em 0} figcaption{font-size:13px;color:#444} ul.notes{font-size:13px;color:#333}"
             "details{margin:1.5em 0} summary{cursor:pointer;font-weight:bold} p.note{font-size:13px;color:#333}"
             "td.n{white-space:nowrap} figure img{max-width:100%} a.small{font-size:13px;font-weight:normal}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _table(frame: pd.DataFrame, image_columns: dict[str, str] | None = None) -> str:
    """An HTML table; ``image_columns`` maps a column to a relative path prefix: its cells become thumbnails."""
    image_columns = image_columns or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            if pd.isna(value) if not isinstance(value, (list, dict)) else False:
                cells.append("<td></td>")
            elif column in image_columns:
                src = html.escape(image_columns[column] + str(value))
                cells.append(f"<td><a href='{src}'><img class='thumb' src='{src}' alt='{src}'></a></td>")
            elif isinstance(value, str) and NUMBER_CELL.match(value):  # a number [and its interval]: kept on one line
                cells.append(f"<td class='n'>{html.escape(value)}</td>")
            else:
                cells.append(f"<td>{html.escape(str(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>"


def _group_counts(gens: pd.DataFrame | None) -> dict[str, tuple[int, int]]:
    """``{group: (prompts, images)}`` and ``all`` from ``generations.csv``."""
    if gens is None or "prompt_idx" not in gens:
        return {}
    counts = {"all": (gens.prompt_idx.nunique(), len(gens))}
    if "group" in gens:
        counts |= {str(g): (rows.prompt_idx.nunique(), len(rows)) for g, rows in gens.groupby("group", sort=False)}
    return counts


def summary_html(metrics: dict[str, Any], gens: pd.DataFrame | None = None) -> str:
    """The headline of a run: per prompt group its copies, similarity p95, alignment and FID with their intervals,
    then what each was measured with and how the intervals were computed, said once."""
    rows = run_summary(metrics, _group_counts(gens))
    if not any(len(row) > 2 for row in rows):
        return "<p>Not evaluated: no similarity, alignment or FID in metrics.json (`memguard evaluate`).</p>"
    notes = [*measured_with({"run": metrics}), interval_note(metrics)]
    transition = metrics.get("transition") or {}
    if transition.get("never_fired_fraction"):
        notes.append("never switched to positive guidance: " + with_interval(
            transition["never_fired_fraction"], transition.get("never_fired_fraction_lo"),
            transition.get("never_fired_fraction_hi")) + " of the images")
    return (_table(pd.DataFrame(rows).fillna("")) + "<ul class='notes'>"
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")


def write_report(run_dir: Path) -> Path:
    """``report.html`` of a run folder: the summary (per group, with intervals), the figures (those present), the
    per-image table, and the whole of ``metrics.json`` collapsed at the end."""
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    gens_file = run_dir / "generations.csv"
    gens = pd.read_csv(gens_file) if gens_file.is_file() else None
    parts = ["<h2 id='summary'>Summary</h2>", summary_html(metrics, gens)]
    agreement = agreement_html(metrics, run_dir)
    parts += [agreement] if agreement else []
    parts.append("<h2>Figures</h2>")
    for name, caption in FIGURES:
        if (run_dir / name).is_file():
            parts.append(f"<figure><a href='{name}'><img src='{name}' alt='{name}'></a>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if gens is not None:
        gens.insert(0, "image", gens.file)
        parts += ["<h2>Images</h2>", _table(gens, {"image": ""})]
    parts += ["<details id='metrics'><summary>metrics.json, every entry</summary>",
              _table(pd.DataFrame(_metrics_rows(metrics), columns=["key", "value"])), "</details>"]
    title = f"memguard run {metrics.get('scenario', '')}/{metrics.get('mitigation', run_dir.name)}"
    path = run_dir / "report.html"
    path.write_text(_page(title, "\n".join(parts)), encoding="utf-8")
    return path


def table_body(parts: dict[str, Any], prefix: str = "") -> str:
    """A table of ``memguard tables`` in HTML: the table, the notes under it (what it was measured with, the
    intervals), the cost table, the trade-off figure (``prefix`` + its file) and the protocol."""
    body = [_table(parts["table"])]
    if parts.get("notes"):
        body.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in parts["notes"]) + "</ul>")
    if parts.get("figure"):
        src = html.escape(prefix + parts["figure"])
        body.append(f"<figure><a href='{src}'><img src='{src}' alt='{src}'></a><figcaption>Copies against alignment, "
                    "one point per mitigation and prompt group, 95% intervals as bars; sweeps joined</figcaption></figure>")
    if parts.get("cost") is not None:
        cost, note = parts["cost"]
        body += [f"<h3>What each mitigation removes and costs</h3><p class='note'>{html.escape(note)}</p>", _table(cost)]
    if parts.get("protocol"):
        body.append(f"<details><summary>Protocol of each run</summary><pre>{html.escape(parts['protocol'])}</pre></details>")
    return "\n".join(body)


def write_table_report(tables_dir: Path, name: str, title: str, parts: dict[str, Any], runs: list[str]) -> Path:
    """``tables/<name>.html``: the table (:func:`table_body`), then each run's grid linked to its own report
    (``../runs/<run>/``)."""
    body = [table_body(parts)]
    for run in dict.fromkeys(runs):
        folder = tables_dir.parent / "runs" / run
        if (folder / "grid.png").is_file():
            body.append(f"<figure><a href='../runs/{run}/report.html'><img src='../runs/{run}/grid.png' alt='{run}'></a>"
                        f"<figcaption>{html.escape(run)}</figcaption></figure>")
    path = tables_dir / f"{name}.html"
    path.write_text(_page(title, "\n".join(body)), encoding="utf-8")
    return path


def write_tables_index(tables_dir: Path, sections: list[tuple[str, str, dict[str, Any], bool]]) -> Path:
    """``tables/report.html``: every table with its trade-off figure right under it, those with runs first, those
    without (the paper's values and the commands that make each row) collapsed at the end. ``sections``:
    (name, title, parts, has runs)."""
    body = [f"<section id='{html.escape(name)}'><h2>{html.escape(title)} <a href='{html.escape(name)}.html' "
            f"class='small'>(with each run's grid)</a></h2>{table_body(parts)}</section>"
            for name, title, parts, present in sections if present]
    missing = [(name, title, parts) for name, title, parts, present in sections if not present]
    if missing:
        body.append("<h2>Tables without runs yet</h2>")
        body += [f"<details><summary>{html.escape(title)}</summary>{table_body(parts)}</details>"
                 for name, title, parts in missing]
    path = tables_dir / "report.html"
    path.write_text(_page("memguard tables", "\n".join(body)), encoding="utf-8")
    return path
