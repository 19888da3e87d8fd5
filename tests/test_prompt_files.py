"""Prompt files in the formats the field ships: text, JSONL, CSV (NeMo's ';', MemBench's ',') and parquet.

The fixtures (tests/fixtures/prompts, README there) are shaped as the real files are (header, separator,
quoting, list-valued cells, escaped slashes), with invented rows; pandas, as the papers' own code reads them, is
the reference for the CSV prompts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from memguard.check import check_inputs
from memguard.errors import UserError
from memguard.runs.prompt_files import Columns, read_prompts_file
from memguard.runs.prompts import load_prompts
from tests.test_configs import compose_config

FIXTURES = Path(__file__).parent / "fixtures" / "prompts"
NEMO = FIXTURES / "nemo_memorized_laion_prompts.csv"
MEMBENCH = FIXTURES / "membench_SD1_final.csv"
WEN = FIXTURES / "wen_sdv1_500_memorized.jsonl"
REN = FIXTURES / "ren_sd1_mem345.txt"
SAIL = FIXTURES / "sail_sd2_mem.jsonl"
WATCH = '"Listen: The Lanterns\' New Single, ""Blue Morning (1992)"""'  # row 3 / line 4, quoted as in the real files


def config(prompts_file: Path, *extra: str):
    return compose_config(["scenario=custom", f"prompts_file={prompts_file}", *extra])


def test_nemo_csv(tmp_path: Path) -> None:
    loaded = read_prompts_file(NEMO)
    assert loaded.texts == pd.read_csv(NEMO, sep=";")["Caption"].tolist()  # NeMo's own pd.read_csv(sep=';')
    assert len(loaded.texts) == 6 and loaded.texts[0] == "The Morning Harbour Business Podcast"
    assert loaded.texts[3] == WATCH and "Caption" not in loaded.texts
    assert loaded.groups == [None] * 6 and loaded.reference_keys == [None] * 6
    assert list(loaded.fields[0]) == ["URL", "type", "mean_sscd", "max_sscd", "Index"]  # no unnamed index column
    assert loaded.fields[0]["URL"] == "https://podcasts.example.com/albumart/1000_1600000001.jpg"
    assert [f["type"] for f in loaded.fields] == ["VM", "TM", "VM", "VM", "VM", "TM"]
    assert loaded.fields[5]["URL"].endswith("?resmode=sharp2&amp;op_sharpen=1&amp;wid=100&amp;hei=100")  # a quoted ';'
    assert loaded.fields[5]["Index"] == "1200000006" and loaded.source.startswith("csv, ';'-separated")

    cfg = config(NEMO, "group_column=type", "references_per_prompt=Index")
    by_config = load_prompts(cfg)
    assert by_config.groups == ["VM", "TM", "VM", "VM", "VM", "TM"]
    assert by_config.reference_keys[0] == "1000000001" and by_config.texts == loaded.texts
    drawn = load_prompts(config(NEMO, "group_column=type", "prompt_draw={count: 4, seed: 1, replace: false}"))
    for text, group, fields in zip(drawn.texts, drawn.groups, drawn.fields):  # a drawn prompt keeps its columns
        i = loaded.texts.index(text)
        assert group == loaded.fields[i]["type"] and fields == loaded.fields[i]


def test_membench_csv() -> None:
    loaded = read_prompts_file(MEMBENCH)
    assert loaded.texts == pd.read_csv(MEMBENCH)["prompt"].tolist()
    assert loaded.texts[0] == "blue navy garden flag single" and len(loaded.texts) == 5
    urls = [f["urls"] for f in loaded.fields]
    assert [len(u) for u in urls] == [1, 1, 4, 3, 4] and all(isinstance(u, list) for u in urls)
    assert urls[2][0] == "https://i.example.com/19532080/r/il/49ee68/1947460177/il_1588xN.1947460177_abcd.jpg"
    assert urls[0] == urls[1] and list(loaded.fields[0]) == ["urls"]
    assert loaded.source.startswith("csv, ','-separated")


def test_jsonl_and_text_files() -> None:
    wen = read_prompts_file(WEN, Columns(key="index"))
    assert len(wen.texts) == 5 and wen.texts[2] == "A grandmother teaching her young otter"
    assert wen.reference_keys[0] == "1000000001" and wen.fields[0]["url"].startswith("https://podcasts.example")
    assert wen.texts[3] == WATCH  # the same caption, its CSV quotes kept, in Wen's JSONL too
    sail = read_prompts_file(SAIL, Columns(group="overfit_type"))
    assert sail.groups == ["MV", "TV", "TV", "TV", "TV"]
    assert sail.texts[1] == "Harbour Floors SFA Splendid 4 Linen 00104_E0001" and "url" in sail.fields[1]
    ren = read_prompts_file(REN)
    assert len(ren.texts) == 5 and ren.texts[3] == WATCH  # a text line is the prompt as written
    assert ren.fields == [{}] * 5 and ren.source == "text, one per line"


def test_webster_parquet(tmp_path: Path) -> None:
    """Columns of Webster et al.'s ground-truth parquets as their gather_groundtruth_labels.py writes them (a
    parquet with caption and url, plus overfit_type, gen_seeds, retrieved_urls, mse_real_gen, template_indices)."""
    frame = pd.DataFrame({
        "caption": ["A grandmother teaching her young otter", "Harbour Floors SFA Splendid 4 Linen 00104_E0001", WATCH],
        "url": ["https://cast.example.org/albumart/1255_1600000002.jpg", "https://a.example/x.jpg", None],
        "index": [900000003, 1200000002, 500000004],
        "overfit_type": ["MV", "TV", "RV"],
        "gen_seeds": [[], [0, 3], [1]],
        "retrieved_urls": [[], ["https://t.example/1.jpg", "https://t.example/2.jpg"], ["https://r.example/3.jpg"]],
        "mse_real_gen": [812.5, 4100.0, 2900.25],
    })
    path = tmp_path / "sdv1_bb_edge_groundtruth.parquet"
    frame.to_parquet(path)
    loaded = read_prompts_file(path, Columns(group="overfit_type", key="index"))
    assert loaded.texts == frame.caption.tolist() and loaded.groups == ["MV", "TV", "RV"]
    assert loaded.reference_keys == ["900000003", "1200000002", "500000004"]
    assert loaded.fields[1]["retrieved_urls"] == ["https://t.example/1.jpg", "https://t.example/2.jpg"]
    assert loaded.fields[1]["gen_seeds"] == [0, 3] and loaded.fields[0]["gen_seeds"] == []
    assert loaded.fields[2]["url"] is None and loaded.fields[2]["mse_real_gen"] == 2900.25
    assert loaded.source.startswith("parquet, prompt column 'caption'")

    frame.drop(columns="caption").to_parquet(path)
    with pytest.raises(UserError, match=r"parquet' has no prompt column .*its columns: url, index, overfit_type"):
        read_prompts_file(path)
    with pytest.raises(UserError, match=r"has no column 'prompt_text' \(prompt_column=prompt_text\); its columns: url"):
        read_prompts_file(path, Columns(prompt="prompt_text"))


def test_bom_windows_line_endings_blank_lines_and_quoted_delimiters(tmp_path: Path) -> None:
    rows = NEMO.read_text(encoding="utf-8").splitlines()
    odd = '6;"a caption; with the delimiter and ""quotes"", too";https://x.example/a.jpg;VM;0.5;0.6;42'
    path = tmp_path / "nemo_bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join([rows[0], rows[1], "", rows[2], "  ", odd, *rows[3:], ""]).encode())
    loaded = read_prompts_file(path)
    assert len(loaded.texts) == 7 and loaded.texts[0] == "The Morning Harbour Business Podcast"
    assert loaded.texts[2] == 'a caption; with the delimiter and "quotes", too'
    assert loaded.texts[4] == WATCH and loaded.fields[2]["Index"] == "42"
    assert not any(t.endswith("\r") for t in loaded.texts)
    assert list(loaded.fields[0]) == list(read_prompts_file(NEMO).fields[0])
    assert loaded.blank_lines == [3, 5]

    text = tmp_path / "prompts.txt"
    text.write_bytes(b"\xef\xbb\xbfa red circle\r\n\r\na blue square\r\n")
    assert read_prompts_file(text).texts == ["a red circle", "a blue square"]  # no BOM in the first prompt
    assert read_prompts_file(text).blank_lines == [2]


def test_memguard_check_counts_every_format(tmp_path: Path) -> None:
    multiline = tmp_path / "multiline.csv"  # a quoted caption over two lines, then a blank line: 2 prompts
    multiline.write_text('prompt,url\n"a red\ncircle",https://a.example/1.jpg\n\n"a blue square",\n')
    for path, count, blank in [(NEMO, 6, None), (MEMBENCH, 5, None), (WEN, 5, None), (REN, 5, None),
                               (multiline, 2, "1 blank line(s) skipped (line 4)")]:
        report = check_inputs(config(path, "model.path=/nonexistent", "evaluate=false"))
        assert f"prompts: {count} from {path}" in " ".join(report.notes), report.notes
        assert not any("prompts_file" in p for p in report.problems), report.problems
        assert [w for w in report.warnings if "blank line" in w] == ([f"prompts_file={str(path)!r}: {blank}"]
                                                                      if blank else [])


@pytest.mark.parametrize("name", ["nemo.txt", "membench.txt", "nemo", "nemo_rows.txt", "wen.txt"])
def test_records_in_a_text_file_are_refused(tmp_path: Path, name: str) -> None:
    source = {"nemo": NEMO, "membench": MEMBENCH, "wen": WEN}[name.split(".")[0].split("_")[0]]
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / name
    path.write_text("".join(lines[1:] if "rows" in name else lines), encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_prompts_file(path)
    message = str(err.value)
    assert "\n" not in message and f"prompts_file={str(path)!r}" in message
    fix = ("rename it to .jsonl" if source == WEN else "rename it to .csv" if "rows" in name
           else "rename it to .csv, or give prompt_column=NAME")
    assert fix in message, message
    if "rows" not in name and source != WEN:
        column = "Caption" if source == NEMO else "prompt"
        assert load_prompts(config(path, f"prompt_column={column}")).texts == read_prompts_file(source).texts


@pytest.mark.parametrize(("content", "suffix", "extra", "message"), [
    ("id;label;link\n1;a;https://x\n", ".csv", [],
     r"'\S+bad.csv' has no prompt column \(one named prompt, caption, text\); its columns: id, label, link; give "
     r"prompt_column=NAME"),
    (None, ".csv", ["prompt_column=Prompt_Text"],
     r"has no column 'Prompt_Text' \(prompt_column=Prompt_Text\); its columns: Caption, URL, type"),
    (None, ".csv", ["group_column=kind"], r"has no column 'kind' \(group_column=kind\); its columns: Caption, URL"),
    (None, ".csv", ["references_per_prompt=gt"], r"has no column 'gt' \(references_per_prompt=gt\)"),
    ("", ".csv", [], r"bad.csv' is empty: no prompts"),
    ("\n\n", ".txt", [], r"bad.txt' is empty: no prompts"),
    ("", ".jsonl", [], r"bad.jsonl' is empty: no prompts"),
    (";Caption;URL\n", ".csv", [], r"bad.csv' has no rows \(only a header\)"),
    ("prompt;url\na cat;https://x;https://y\n", ".csv", [], r"line 2 has 3 ';'-separated fields, the header 2: quote"),
    ("prompt,url\n,https://x\n", ".csv", [], r"line 2 has an empty prompt \(column 'prompt'\)"),
    ('{"url": "https://x"}\n', ".jsonl", [], r"line 1 is not a JSON object with one of the fields prompt, caption"),
    ("a cat\n", ".txt", ["group_column=type"], r"group_column=type needs a prompt file with columns"),
    (b"\xff\xfe a", ".txt", [], r"is not UTF-8 text"),
])
def test_bad_prompt_files_say_what_and_how_in_one_line(tmp_path: Path, content, suffix: str, extra: list[str],
                                                        message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    if content is None:
        path.write_bytes(NEMO.read_bytes())
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=message) as err:
        load_prompts(config(path, *extra))
    assert "\n" not in str(err.value) and f"prompts_file={str(path)!r}" in str(err.value)


def test_column_keys_need_a_prompt_file() -> None:
    cfg = compose_config(["scenario=custom", "prompts=[a cat]", "prompt_column=caption"])
    with pytest.raises(UserError, match="prompt_column=caption needs a prompts_file"):
        load_prompts(cfg)
    assert OmegaConf.select(compose_config([]), "prompt_column") is None  # documented, off by default
    assert OmegaConf.select(compose_config([]), "group_column") is None


def test_url_lists_of_every_format_become_fetch_jobs() -> None:
    """memguard fetch's image URL lists read the prompt file as a run does: MemBench's list-valued cells give one
    job per URL, NeMo's CSV one per row, Wen's JSONL one per line under its references key."""
    from memguard.fetch.images import jobs

    membench = jobs(MEMBENCH, "urls", None)
    assert [j.key for j in membench] == ["0", "1"] + ["2"] * 4 + ["3"] * 3 + ["4"] * 4
    assert [j.n for j in membench if j.key == "2"] == [0, 1, 2, 3] and membench[0].name == "0/0.png"
    nemo = jobs(NEMO, "URL", "Index")
    assert len(nemo) == 6 and nemo[0].key == "1000000001" and nemo[5].url.endswith("&amp;hei=100")
    wen = jobs(WEN, "url", "index")
    assert [j.name for j in wen][:2] == ["1000000001/0.png", "2000000002/0.png"]
