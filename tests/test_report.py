"""report.html of a run folder and of `memguard tables`: relative links only, every image loads in a browser;
the labelled grid; `memguard plot`."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard.evaluate import evaluate
from memguard.runner import run
from memguard.runs.plots import plot_norms
from memguard.tables import write_tables
from tests.test_cli import memguard_here as memguard
from tests.test_evaluate import make_references
from tests.test_run import config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = [...document.images].map(i => i.getAttribute("src") + " " + i.naturalWidth).join("\\n");
  document.body.appendChild(out);
});
</script></body>"""


LAYOUT = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "layout-check";
  const headings = [...document.querySelectorAll("h2")].map(h => h.textContent);
  const first = document.querySelector("h2 + table");
  const details = document.querySelector("details#metrics");
  const visible = [...document.querySelectorAll("td")].filter(td => td.checkVisibility()).map(td => td.textContent);
  out.textContent = JSON.stringify({headings, firstTable: first ? [...first.rows].map(r => [...r.cells].map(c => c.textContent)) : null,
    detailsOpen: details ? details.open : null, detailsLast: details ? details === [...document.body.children].filter(e => e.tagName !== "SCRIPT").pop() : null,
    visibleCells: visible});
  document.body.appendChild(out);
});
</script></body>"""


def chromium_dom(page: Path, script: str, element: str) -> str:
    """Open a copy of ``page`` with ``script`` in headless Chromium and return the text ``script`` put into
    ``<pre id=element>``."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(page.read_text().replace("</body>", script))
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    probe.unlink()
    found = re.search(f'<pre id="{element}">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no {element} in Chromium's DOM: {result.stderr[-2000:]}"
    return html.unescape(found.group(1))


def image_widths(page: Path) -> dict[str, int]:
    """Open ``page`` in headless Chromium (with a script that writes each image's naturalWidth into the DOM) and
    return {src: naturalWidth}; 0 means the image did not load."""
    lines = chromium_dom(page, CHECK, "image-check").splitlines()
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1]) for line in lines if line}


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    run_dir = root / "outputs" / "runs" / "custom" / "none"
    run(config(tiny_model_dir, run_dir))
    make_references(run_dir, root / "refs")
    evaluate(config(tiny_model_dir, run_dir, "metrics=pixel", f"references={root / 'refs'}",
                    f"paths.cache_dir={root / 'cache'}"))
    return run_dir


def test_report_links_are_relative_and_name_every_image(evaluated_run: Path) -> None:
    page = (evaluated_run / "report.html").read_text()
    sources = re.findall(r"(?:src|href)='([^']+)'", page)
    assert sources and not [s for s in sources if s.startswith(("/", "file:", "http"))]
    for name in ("grid.png", "d_curves.png", "norms.png", "images/00000_0.png", "images/00001_1.png"):
        assert f"src='{name}'" in page, name
    assert "similarity.p95" in page  # the metrics are on the page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")
def test_report_opens_with_the_summary_and_ends_with_metrics_collapsed(evaluated_run: Path) -> None:
    layout = json.loads(chromium_dom(evaluated_run / "report.html", LAYOUT, "layout-check"))
    assert layout["headings"] == ["Summary", "Figures", "Images"]  # the dump is no heading of its own
    header, *rows = layout["firstTable"]
    assert header[:3] == ["group", "prompts / images", "similarity p95"] and "alignment" not in header  # metrics=pixel
    assert [r[0] for r in rows] == ["all"] and rows[0][1] == "2 / 4"
    metrics = json.loads((evaluated_run / "metrics.json").read_text())["similarity"]
    shown = re.fullmatch(r"(\d\.\d{2,3}) \[(\d\.\d{2,3}), (\d\.\d{2,3})\]", rows[0][2])  # 3 digits [lo, hi]
    assert shown, rows[0][2]
    assert [float(v) for v in shown.groups()] == pytest.approx([metrics[k] for k in ("p95", "p95_lo", "p95_hi")], abs=0.006)
    assert layout["detailsOpen"] is False and layout["detailsLast"] is True
    assert "similarity.p95" not in layout["visibleCells"]  # collapsed: the dump's rows are not shown


def test_grid_has_a_reference_column(evaluated_run: Path) -> None:
    grid = Image.open(evaluated_run / "grid.png")
    assert grid.width > grid.height  # 2 prompts x (reference + 2 seeds), labels at the left
    rgb = np.asarray(grid.convert("RGB")).astype(int)
    reds = int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())
    assert reds > 50  # two images are exact copies of references: outlined


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")
def test_every_image_of_the_reports_loads_in_chromium(evaluated_run: Path) -> None:
    widths = image_widths(evaluated_run / "report.html")
    assert len(widths) == 3 + 4 and all(w > 0 for w in widths.values()), widths  # 3 figures, 4 thumbnails
    moved = evaluated_run.parent.parent.parent / "copied"  # a copied folder still works
    shutil.copytree(evaluated_run, moved / "runs" / "tiny" / "none")
    widths = image_widths(moved / "runs" / "tiny" / "none" / "report.html")
    assert widths and all(w > 0 for w in widths.values()), widths
    write_tables(moved)
    widths = image_widths(moved / "tables" / "tiny.html")
    assert list(widths) == ["../runs/tiny/none/grid.png"] and all(w > 0 for w in widths.values()), widths
    (moved / "runs" / "tiny" / "none" / "grid.png").unlink()  # the check can fail: a missing image reads 0
    page = moved / "runs" / "tiny" / "none" / "report.html"
    page.write_text(page.read_text().replace("src='d_curves.png'", "src='d_curves_missing.png'"))
    assert image_widths(page)["d_curves_missing.png"] == 0


def test_plot_draws_norms_and_refuses_folders_without_them(evaluated_run: Path, tmp_path: Path) -> None:
    out = plot_norms([evaluated_run, evaluated_run], tmp_path / "two.png")
    assert Image.open(out).width > Image.open(evaluated_run / "norms.png").width
    old = tmp_path / "old"
    shutil.copytree(evaluated_run, old)
    traj = (old / "trajectories.csv").read_text().splitlines()
    (old / "trajectories.csv").write_text("\n".join(",".join(line.split(",")[:6]) for line in traj) + "\n")
    result = memguard("plot", f"run_dir={old}", cwd=tmp_path)
    assert result.returncode == 2
    assert "has no recorded norm_c/norm_u" in result.stderr and "re-run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_summary_reads_every_sections_groups_and_formats_three_digits() -> None:
    from memguard.runs.summary import run_summary, with_interval

    assert with_interval(0.6071428571428572, 0.5871, 0.6221) == "0.607 [0.587, 0.622]"
    assert with_interval(0.142857, 0.0, 0.357) == "0.143 [0.000, 0.357]"
    assert with_interval(1742.54) == "1740" and with_interval(0.31, None, None) == "0.310"
    metrics = {  # a section the summary does not know, with a group no other section has, is shown too
        "similarity": {"embedder": "pixel", "p95": 0.9, "p95_lo": 0.8, "p95_hi": 0.95,
                       "groups": {"memorized": {"p95": 0.97, "p95_lo": 0.96, "p95_hi": 0.99}}},
        "cost": {"groups": {"unmemorized": {"alignment_drop": 0.0123, "alignment_drop_lo": 0.01,
                                            "alignment_drop_hi": 0.015, "note": "text"}}},
    }
    rows = {r["group"]: r for r in run_summary(metrics, {"all": (3, 12)})}
    assert list(rows) == ["all", "memorized", "unmemorized"]
    assert rows["all"]["similarity p95"] == "0.900 [0.800, 0.950]" and rows["all"]["prompts / images"] == "3 / 12"
    assert rows["memorized"]["similarity p95"] == "0.970 [0.960, 0.990]"
    assert rows["unmemorized"]["cost alignment_drop"] == "0.0123 [0.0100, 0.0150]"
    assert rows["unmemorized"]["similarity p95"] == ""  # no entry for that group: no number, not the overall one
