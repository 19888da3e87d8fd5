"""`memguard compare` on the shipped tiny model: the leaderboard from ordinary run folders, a rerun that makes nothing
again, a method without a declared knob refused in one line, the operating-point rule, the page sorting in Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import memguard
from memguard.compare import pick_points, run_compare
from memguard.errors import UserError
from memguard.runs.leaderboard import operating_points, seed_split
from tests.test_report import CHROMIUM, chromium_dom

FAST = ["scenario=tiny", "images_per_prompt=2", "sampler.steps=4", "progress=false", "metrics.fid=null",
        "metrics.detection=null", "compare.methods=[none,stp]", "compare.points=2"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    assert run_compare([f"paths.output_dir={out}", *FAST])["finished"]
    return out


def test_compare_writes_the_leaderboard_from_run_folders(compared: Path) -> None:
    output = compared / "compare" / "tiny"
    board, points = pd.read_csv(output / "leaderboard.csv"), pd.read_csv(output / "points.csv")
    assert set(board.method) == {"none", "stp"}
    assert sorted(points.point.unique()) == ["default", "tau=300", "tau=900"]  # stp's weakest and strongest points
    assert set(points.split) == {"calibration", "held_out"} and (points.n_images == 14).all()  # 14 prompts x 1 seed
    for column in ("mem_sim_p95", "mem_copy_fraction", "ctl_alignment", "forward_per_image", "seconds_per_image"):
        assert points[column].notna().all(), column
    assert (compared / "runs" / "tiny" / "compare" / "stp" / "tau=300" / "images").is_dir()  # ordinary run folders
    assert (output / "tradeoff.png").stat().st_size > 10_000
    assert "| none | default |" in (output / "leaderboard.md").read_text()


def test_a_rerun_makes_no_finished_image_again(compared: Path) -> None:
    folder = compared / "runs" / "tiny" / "compare" / "stp" / "tau=900" / "images"
    images = sorted(folder.glob("*.png"))
    before = {p.name: p.stat().st_mtime_ns for p in images}
    images[0].unlink()  # an interrupted compare: one image missing
    run_compare([f"paths.output_dir={compared}", *FAST])
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == [images[0].name]


def test_a_method_without_a_declared_knob_is_refused_naming_its_yaml(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(memguard.CONF_DIR, conf)
    (conf / "mitigation" / "bare.yaml").write_text("name: bare\nschedule:\n  _target_: memguard.guidance.Constant\n"
                                                   "  scale: 1.0\n")
    monkeypatch.setattr(memguard, "CONF_DIR", conf)
    with pytest.raises(UserError, match=r"mitigation=bare declares no strength knob.*bare\.yaml"):
        run_compare([f"paths.output_dir={tmp_path}", "compare.methods=[none,bare]"])
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_operating_point_is_chosen_within_the_budget_on_calibration_seeds() -> None:
    def row(method: str, point: str, split: str, sim: float, ctl: float) -> dict:
        return {"method": method, "point": point, "split": split, "mem_sim_p95": sim, "mem_copy_fraction": sim,
                "ctl_alignment": ctl, "mem_alignment": ctl, "seconds_per_image": 1.0, "forward_per_image": 10,
                "knobs": "{}"}
    points = pd.DataFrame([row("none", "default", "calibration", 0.9, 0.80), row("none", "default", "held_out", 0.9, 0.8),
                           row("a", "weak", "calibration", 0.7, 0.79), row("a", "weak", "held_out", 0.6, 0.7),
                           row("a", "strong", "calibration", 0.2, 0.70), row("a", "strong", "held_out", 0.1, 0.6),
                           row("b", "only", "calibration", 0.1, 0.5), row("b", "only", "held_out", 0.1, 0.5)])
    board = operating_points(points, budget=0.05).set_index("method")
    assert board.loc["a", "point"] == "weak"  # strong loses 12.5% of none's control alignment
    assert board.loc["a", "mem_sim_p95"] == 0.6  # reported on the held-out seeds
    assert board.loc["a", "ctl_alignment_loss"] == pytest.approx(1 - 0.7 / 0.8)
    assert board.loc["b", "point"] == "no point within the budget"
    assert list(board.index)[-1] == "b"


def test_seed_split_is_frozen_by_seed_rank_and_pick_points_keeps_the_ends() -> None:
    generations = pd.DataFrame({"prompt_idx": np.repeat([0, 1], 4), "seed": [3, 1, 0, 2] * 2})
    assert list(seed_split(generations, 0.5)) == ["held_out", "calibration", "calibration", "held_out"] * 2
    assert pick_points([{"k": v} for v in range(5)], 3) == [{"k": 0}, {"k": 2}, {"k": 4}]


SORT = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "sort-check";
  const table = document.getElementById("leaderboard");
  const column = [...table.tHead.rows[0].cells].findIndex(th => th.textContent.startsWith("Seconds / image"));
  const read = () => [...table.tBodies[0].rows].map(r => r.cells[column].dataset.value);
  table.tHead.rows[0].cells[column].click();
  const up = read();
  table.tHead.rows[0].cells[column].click();
  out.textContent = JSON.stringify({up, down: read()});
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")
def test_the_leaderboard_page_sorts_by_a_column_in_chromium(compared: Path) -> None:
    order = json.loads(chromium_dom(compared / "compare" / "tiny" / "leaderboard.html", SORT, "sort-check"))
    up, down = [float(v) for v in order["up"]], [float(v) for v in order["down"]]
    assert up == sorted(up) and down == sorted(down, reverse=True) and len(up) == 2
