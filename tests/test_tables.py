"""memguard tables: the paper's rows and columns, values where runs exist, commands where they do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memguard.tables import PAPER_TABLES, write_tables
from tests.test_cli import memguard_here as memguard

SSCD = "sscd[sscd_disc_large.torchscript.pt, dcr]"


def fake_run(root: Path, scenario: str, mitigation: str, p95: float, groups: dict | None = None,
             intervals: bool = False) -> None:
    folder = root / "runs" / scenario / mitigation
    folder.mkdir(parents=True)
    similarity = {"embedder": SSCD, "p95": p95, "mean": p95 / 2, "std": 0.1234, "copy_fraction": 0.25}
    if intervals:
        similarity |= {"p95_lo": p95 - 0.02, "p95_hi": p95 + 0.015, "mean_lo": p95 / 2 - 0.01,
                       "mean_hi": p95 / 2 + 0.01, "copy_fraction_lo": 0.1, "copy_fraction_hi": 0.4}
    if groups:
        similarity["groups"] = {g: {"p95": v, "mean": v / 2, "std": 0.01, "copy_fraction": v} for g, v in groups.items()}
    (folder / "metrics.json").write_text(json.dumps({
        "similarity": similarity,
        "alignment": {"scorer": "clip[ViT-g-14, ViT-g-14.bin]", "mean": 0.31, "std": 0.02,
                      **({"mean_lo": 0.3, "mean_hi": 0.32} if intervals else {})},
        "fid": {"kind": "fid", "features": "inception-v3-compat[w.pth, pool 2048]", "value": 12.345},
        "transition": {"never_fired_fraction": 0.125},
    }))


def evaluated_run(root: Path, scenario: str, mitigation: str, similarity: dict[str, list[list[float]]],
                  alignment: dict[str, list[list[float]]], copy_threshold: float | None = None) -> pd.DataFrame:
    """A run folder as `memguard evaluate` leaves it, from per-image scores: ``{group: [[prompt's images]]}``;
    its metrics.json written by the evaluation's own summaries (memguard.evaluate), intervals included."""
    import torch

    from memguard.evaluate import alignment_summary, by_group, prompt_ids, similarity_summary

    records, idx = [], 0
    for group, prompts in similarity.items():
        for images, scores in zip(prompts, alignment[group]):
            records += [{"prompt_idx": idx, "group": group, "seed": k, "similarity": s, "alignment": a}
                        for k, (s, a) in enumerate(zip(images, scores))]
            idx += 1
    gens = pd.DataFrame(records)
    folder = root / "runs" / scenario / mitigation
    folder.mkdir(parents=True)
    gens.to_csv(folder / "generations.csv", index=False)
    sim, align = torch.tensor(gens.similarity.to_numpy()), torch.tensor(gens.alignment.to_numpy())
    metrics = {
        "similarity": {"embedder": SSCD, "copy_threshold": copy_threshold,
                       **similarity_summary(sim, prompt_ids(gens), 0.5, copy_threshold),
                       **by_group(gens, "similarity", lambda v, p: similarity_summary(v, p, 0.5, copy_threshold))},
        "alignment": {"scorer": "clip[ViT-g-14, ViT-g-14.bin]", **alignment_summary(align, prompt_ids(gens)),
                      **by_group(gens, "alignment", alignment_summary)}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return gens


def test_paper_tables_have_the_papers_rows_and_columns(tmp_path: Path) -> None:
    fake_run(tmp_path, "wen_dup200", "dtp", 0.61)
    write_tables(tmp_path)
    table3 = pd.read_csv(tmp_path / "tables" / "table3.csv")
    assert table3.Method.tolist() == ["No mitigation", "Add rand word", "Add rand numb", "Wen et al. (l_target=3)",
                                      "Wen et al. (l_target=1)", "Ren et al.", "Ours (DTP)", "Ours (OG + DTP)"]
    assert list(table3.columns[:18]) == [
        "Method", "Prompts", "Similarity (95pc)", "Similarity (95pc)_lo", "Similarity (95pc)_hi",
        "Similarity (95pc) [paper]", "Similarity mean", "Similarity mean_lo", "Similarity mean_hi", "Similarity std",
        "Mean ± Std [paper]", "CLIP Score", "CLIP Score_lo", "CLIP Score_hi", "CLIP Score [paper]", "FID",
        "FID [paper]", "similarity by"]
    dtp = table3.set_index("Method").loc["Ours (DTP)"]
    assert dtp["Similarity (95pc)"] == 0.61 and dtp["Similarity (95pc) [paper]"] == 0.5885
    assert dtp["Similarity mean"] == 0.305 and dtp["Similarity std"] == 0.1234
    assert dtp["FID"] == 12.345 and dtp["CLIP Score"] == 0.31 and pd.isna(dtp["CLIP Score_lo"])  # an older folder
    assert "| Ours (DTP) | 0.610 | 0.5885 | 0.305 ± 0.12 | 0.2866 ± 0.16 | 0.310 | 0.302 | 12.3 | 138.92 |" in \
        (tmp_path / "tables" / "table3.md").read_text()
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
    assert not (tmp_path / "tables" / "tiny2.csv").exists()  # the second miniature's table once it has runs


def test_tiny2_table_is_written_beside_tiny_once_it_has_runs(tmp_path: Path) -> None:
    fake_run(tmp_path, "tiny2", "auto", 0.3, {"trigger": 0.25, "unique": 0.05})
    fake_run(tmp_path, "tiny2", "none", 0.9, {"trigger": 0.8, "unique": 0.1})
    write_tables(tmp_path)
    tiny2 = pd.read_csv(tmp_path / "tables" / "tiny2.csv")
    assert list(zip(tiny2.Mitigation, tiny2.Captions)) == [("none", "trigger"), ("none", "unique"),
                                                           ("auto", "trigger"), ("auto", "unique")]
    assert tiny2["Copy fraction"].tolist() == [0.8, 0.1, 0.25, 0.05]
    assert (tmp_path / "tables" / "tiny2.md").read_text().startswith("## The second miniature, tiny2")
    assert pd.read_csv(tmp_path / "tables" / "tiny.csv").empty


@pytest.mark.slow
def test_tables_command(tmp_path: Path) -> None:
    fake_run(tmp_path, "laion100k", "none", 0.4)
    result = memguard("tables", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "## Table 5 (laion100k)" in result.stdout and "| No mitigation | 0.400 | 0.3952 |" in result.stdout


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


def test_markdown_has_three_digits_and_intervals_the_csv_full_precision(tmp_path: Path) -> None:
    fake_run(tmp_path, "laion10k", "none", 0.6071428571428572, intervals=True)
    fake_run(tmp_path, "laion10k", "stp_t500", 0.2857142857142857, intervals=True)
    write_tables(tmp_path)
    text = (tmp_path / "tables" / "table1.md").read_text()
    table, below = text.split("\n\n- ", 1)
    row = next(line for line in table.splitlines() if line.startswith("| No mitigation"))
    assert row.startswith("| No mitigation | 0.607 [0.587, 0.622] | 0.6504 | 0.310 [0.300, 0.320] | 0.3027 | 12.3 |")
    assert "0.6071428" not in table and "sscd[" not in table and "clip[" not in table  # no per-row networks
    assert below.count(SSCD) == 1 and below.count("clip[ViT-g-14, ViT-g-14.bin]") == 1  # stated once, under it
    assert "95% bootstrap interval over prompts" in below
    csv = pd.read_csv(tmp_path / "tables" / "table1.csv").set_index("Method")
    assert csv.loc["No mitigation", "Similarity (95pc)"] == 0.6071428571428572  # full precision
    assert csv.loc["No mitigation", "Similarity (95pc)_lo"] == pytest.approx(0.5871428571428572)
    assert csv.loc["Ours (STP)", "CLIP Score_hi"] == 0.32 and csv.loc["Ours (STP)", "similarity by"] == SSCD
    html = (tmp_path / "tables" / "table1.html").read_text()
    assert "<td class='n'>0.607 [0.587, 0.622]</td>" in html and html.count(SSCD) == 1


def test_groups_split_the_paper_tables_and_the_cost_table_compares_with_none(tmp_path: Path) -> None:
    """Table 3's scenario with a memorized and an unmemorized group: a row per group, and what each mitigation
    removes from the memorized prompts and costs the unmemorized ones, against `none`, with paired intervals."""
    rng = np.random.default_rng(0)
    memorized = [[0.9, 0.95, 0.85], [0.92, 0.97, 0.9], [0.8, 0.9, 0.95], [0.99, 0.9, 0.93]]
    control_sim = [[0.3, 0.35, 0.4], [0.2, 0.3, 0.25], [0.4, 0.3, 0.35]]
    control_align = [list(rng.uniform(0.28, 0.34, 3)) for _ in control_sim]
    none = evaluated_run(tmp_path, "wen_dup200", "none", {"memorized": memorized, "unmemorized": control_sim},
                         {"memorized": [[0.3] * 3] * 4, "unmemorized": control_align})
    evaluated_run(tmp_path, "wen_dup200", "dtp",  # half the copies gone, alignment 0.02 lower on the control
                  {"memorized": [[0.4, 0.95, 0.3], [0.92, 0.3, 0.9], [0.3, 0.9, 0.3], [0.99, 0.3, 0.93]],
                   "unmemorized": control_sim},
                  {"memorized": [[0.3] * 3] * 4, "unmemorized": [[a - 0.02 for a in p] for p in control_align]})
    write_tables(tmp_path)
    table3 = pd.read_csv(tmp_path / "tables" / "table3.csv")
    dtp = table3[table3.Method == "Ours (DTP)"].set_index("Prompts")
    assert list(dtp.index) == ["all", "memorized", "unmemorized"]
    assert dtp.loc["memorized", "Similarity (95pc)"] == pytest.approx(np.percentile([0.4, 0.95, 0.3, 0.92, 0.3, 0.9, 0.3,
                                                                                    0.9, 0.3, 0.99, 0.3, 0.93], 95))
    assert dtp.loc["memorized", "Similarity (95pc)_lo"] <= dtp.loc["memorized", "Similarity (95pc)"]
    assert pd.isna(dtp.loc["memorized", "Similarity (95pc) [paper]"]) and dtp.loc["all", "Similarity (95pc) [paper]"] == 0.5885
    cost = pd.read_csv(tmp_path / "tables" / "table3_cost.csv").set_index("Mitigation")
    assert list(cost.index) == ["Ours (DTP)"]  # none is the reference; absent runs have no row
    removed = np.percentile(np.ravel(memorized), 95) - dtp.loc["memorized", "Similarity (95pc)"]  # no copy threshold: p95
    assert cost.loc["Ours (DTP)", "Copies removed"] == pytest.approx(removed)
    assert cost.loc["Ours (DTP)", "Alignment lost"] == pytest.approx(0.02)
    assert cost.loc["Ours (DTP)", "Alignment lost_lo"] == pytest.approx(0.02)  # paired: the same prompts, shifted
    assert cost.loc["Ours (DTP)", "Copies removed_lo"] < removed < cost.loc["Ours (DTP)", "Copies removed_hi"]
    text = (tmp_path / "tables" / "table3.md").read_text()
    assert "| Ours (DTP) | memorized |" in text and "What each mitigation removes and costs" in text
    assert "groups memorized" in text and "`unmemorized` prompts" in text
    assert len(none) == 21


def test_tradeoff_figure_has_a_point_per_mitigation_and_joins_sweeps(tmp_path: Path) -> None:
    from PIL import Image

    from memguard.runs.plots import sweeps
    from memguard.tables import lay_out, tiny_table

    for name, p95 in [("none", 0.99), ("dtp", 0.7), ("stp_t300", 0.5), ("stp_t500", 0.6), ("stp_t700", 0.8)]:
        fake_run(tmp_path, "tiny", name, p95, {"trigger": p95, "unique": p95 / 3}, intervals=True)
    write_tables(tmp_path)
    figure = tmp_path / "tables" / "tiny_tradeoff.png"
    assert Image.open(figure).width > 600
    assert not (tmp_path / "tables" / "table1_tradeoff.png").exists()  # no run of Table 1: no figure
    laid = lay_out("tiny", "tiny", tiny_table(tmp_path / "runs"), "tiny", [], tmp_path, tmp_path / "runs", "", tiny=True)
    for panel in ("trigger", "unique"):
        points = [p for p in laid.points if p["panel"] == panel]
        assert sorted(p["run"] for p in points) == ["dtp", "none", "stp_t300", "stp_t500", "stp_t700"]
    assert {p["run"]: p["y"] for p in laid.points if p["panel"] == "trigger"} == {  # copy fractions
        "none": 0.99, "dtp": 0.7, "stp_t300": 0.5, "stp_t500": 0.6, "stp_t700": 0.8}
    page = (tmp_path / "tables" / "report.html").read_text()
    assert "src='tiny_tradeoff.png'" in page and page.index("The tiny scenario") < page.index("src='tiny_tradeoff.png'")
    assert sweeps(["none", "stp_t700", "stp_t300", "og_stp_t500", "wen_l1", "wen_l3", "interval_700_0",
                   "interval_600_0", "og_stp_t500_og2", "og_stp_t500_og4", "og_stp_t300_og2"]) == [
        ["stp_t300", "stp_t700"], ["wen_l1", "wen_l3"], ["interval_600_0", "interval_700_0"],
        ["og_stp_t500_og2", "og_stp_t500_og4"]]
