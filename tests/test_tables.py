"""memguard tables: the paper's rows and columns, values where runs exist, commands where they do not."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from memguard.tables import PAPER_TABLES, write_tables
from tests.test_cli import memguard

SSCD = "sscd[sscd_disc_large.torchscript.pt, dcr]"


def fake_run(root: Path, scenario: str, mitigation: str, p95: float, groups: dict | None = None) -> None:
    folder = root / "runs" / scenario / mitigation
    folder.mkdir(parents=True)
    similarity = {"embedder": SSCD, "p95": p95, "mean": p95 / 2, "std": 0.1234, "copy_fraction": 0.25}
    if groups:
        similarity["groups"] = {g: {"p95": v, "mean": v / 2, "std": 0.01, "copy_fraction": v} for g, v in groups.items()}
    (folder / "metrics.json").write_text(json.dumps({
        "similarity": similarity,
        "alignment": {"scorer": "clip[ViT-g-14, ViT-g-14.bin]", "mean": 0.31, "std": 0.02},
        "fid": {"kind": "fid", "features": "inception-v3-compat[w.pth, pool 2048]", "value": 12.345},
        "transition": {"never_fired_fraction": 0.125},
    }))


def test_paper_tables_have_the_papers_rows_and_columns(tmp_path: Path) -> None:
    fake_run(tmp_path, "wen_dup200", "dtp", 0.61)
    write_tables(tmp_path)
    table3 = pd.read_csv(tmp_path / "tables" / "table3.csv")
    assert table3.Method.tolist() == ["No mitigation", "Add rand word", "Add rand numb", "Wen et al. (l_target=3)",
                                      "Wen et al. (l_target=1)", "Ren et al.", "Ours (DTP)", "Ours (OG + DTP)"]
    assert list(table3.columns[:9]) == ["Method", "Similarity (95pc)", "Similarity (95pc) [paper]", "Mean ± Std",
                                        "Mean ± Std [paper]", "CLIP Score", "CLIP Score [paper]", "FID", "FID [paper]"]
    dtp = table3.set_index("Method").loc["Ours (DTP)"]
    assert dtp["Similarity (95pc)"] == 0.61 and dtp["Similarity (95pc) [paper]"] == 0.5885
    assert dtp["Mean ± Std"] == "0.3050 ± 0.12" and dtp["FID"] == 12.35 and dtp["CLIP Score"] == 0.31
    assert dtp["similarity by"] == SSCD and dtp["fid by"].startswith("fid: inception")
    assert pd.isna(dtp["command"])
    none = table3.set_index("Method").loc["No mitigation"]
    assert pd.isna(none["Similarity (95pc)"]) and none["Similarity (95pc) [paper]"] == 0.7977
    assert none["command"] == "memguard run scenario=wen_dup200 mitigation=none metrics=paper"
    for table in PAPER_TABLES:
        frame = pd.read_csv(tmp_path / "tables" / f"table{table.number}.csv")
        assert frame.Method.tolist() == [r.label for r in table.rows]
        assert (tmp_path / "tables" / f"table{table.number}.md").read_text().startswith(f"## Table {table.number}")
    table1 = pd.read_csv(tmp_path / "tables" / "table1.csv").set_index("Method")
    assert table1.loc["Ours (STP)", "command"].endswith("mitigation=stp metrics=paper mitigation.schedule.tau=500")
    assert table1.loc["No mitigation", "FID [paper]"] == pytest.approx(16.8373)


def test_tiny_table_has_a_row_per_mitigation_and_group(tmp_path: Path) -> None:
    fake_run(tmp_path, "tiny", "none", 0.99, {"trigger": 0.99, "unique": 0.5})
    fake_run(tmp_path, "tiny", "dtp", 0.7, {"trigger": 0.7, "unique": 0.4})
    fake_run(tmp_path, "tiny", "my_schedule", 0.6)
    write_tables(tmp_path)
    tiny = pd.read_csv(tmp_path / "tables" / "tiny.csv")
    assert list(zip(tiny.Mitigation, tiny.Captions)) == [("none", "trigger"), ("none", "unique"), ("dtp", "trigger"),
                                                         ("dtp", "unique"), ("my_schedule", "all")]
    assert tiny["Copy fraction"].tolist() == [0.99, 0.5, 0.7, 0.4, 0.25]
    assert tiny["never switched"].tolist() == [0.125] * 5


@pytest.mark.slow
def test_tables_command(tmp_path: Path) -> None:
    fake_run(tmp_path, "laion100k", "none", 0.4)
    result = memguard("tables", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "## Table 5 (laion100k)" in result.stdout and "| No mitigation | 0.4 | 0.3952 |" in result.stdout


def test_tables_print_the_protocol_each_run_folder_ran_with(tiny_model_dir: Path, tmp_path: Path) -> None:
    from memguard.runner import run
    from tests.test_run import config

    runs = tmp_path / "runs" / "laion10k"
    run(config(tiny_model_dir, runs / "rand_word", "mitigation=rand_word", "metrics=pixel", "evaluate=false",
               "prompt_draw={count: 3, seed: 42, replace: true}", "images_per_prompt=1", "sampler.steps=3"))
    run(config(tiny_model_dir, runs / "ren", "mitigation=ren", "metrics=pixel", "evaluate=false", "sampler.steps=3"))
    write_tables(tmp_path)
    text = (tmp_path / "tables" / "table1.md").read_text()
    protocol = text.split("Protocol (from each run folder's config.yaml):")[1]
    word = next(line for line in protocol.splitlines() if "laion10k/rand_word" in line)
    assert "1 image(s)/prompt" in word and "prompts drawn: 3 (seed 42, with replacement)" in word
    assert "3 steps, scale 7.5" in word and "RandomTokens(kind=word, count=4" in word
    assert "metrics pixel (similarity: PixelEmbedder)" in word
    ren = next(line for line in protocol.splitlines() if "laion10k/ren" in line)
    assert "2 image(s)/prompt" in ren and "RenAttention(c1=1.25, mask_trailing=True, mask_branches=both)" in ren
    assert "laion10k/none" not in protocol  # no folder, no line
