"""The prompt-set scenarios (nemo500, ren_sd1_345, ren_sd2_219, sail_sd2_219, membench3000, and webster500's NeMo
labels) end to end on the tiny model: their prompt files are the fixtures of tests/fixtures/prompts (invented rows
shaped as the real files), served with their image URLs pointed at a server on 127.0.0.1; `memguard fetch` fetches
the prompt files and references, `memguard run` generates (1 image per prompt, 2 steps, 32 px) and evaluates with
the paper's metric code paths on stand-in networks; then the per-group entries of metrics.json are checked."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memguard.check import check_inputs
from memguard.errors import UserError
from memguard.fetch.command import fetch
from memguard.runner import run
from memguard.runs.prompts import load_prompts
from tests.fetch_servers import serve, static, status
from tests.rehearsal import paper_metric_overrides, write_metric_weights
from tests.test_configs import compose_config
from tests.test_fetch import png

FIXTURES = Path(__file__).parent / "fixtures" / "prompts"
DEAD = "dead.example.org"  # an image host whose every URL answers 404


def _lines(name: str, keep: list[int]) -> str:
    """The fixture's lines ``keep`` (0: a CSV's header), joined as the file joins them."""
    lines = (FIXTURES / name).read_text(encoding="utf-8").splitlines()
    return "\n".join(lines[i] for i in keep) + "\n"


def _local(text: str, url: str) -> str:
    """Every http(s) URL of a prompt file pointed at ``url``/img/<host>/<path> (JSON's escaped slashes kept)."""
    text = re.sub(r"https?:\\/\\/", (url + "/img/").replace("/", "\\\\/"), text)
    return re.sub(r"https?://", url + "/img/", text)


# the served files: (fixture, lines kept); the prompt files of each scenario are cut to 2-4 prompts
FILES = {
    "nemo.csv": ("nemo_memorized_laion_prompts.csv", [0, 1, 2, 4]),  # VM, TM, VM (a caption with quotes)
    "nemo_unmemorized.csv": ("nemo_unmemorized_laion_prompts.csv", [0, 1, 3]),
    "ren_sd1.txt": ("ren_sd1_mem345.txt", [0, 1, 3]),
    "ren_nomem.txt": ("ren_group_nomem500.txt", [0, 1]),
    "wen.jsonl": ("wen_sdv1_500_memorized.jsonl", [0, 1, 2, 3, 4]),
    "ren_sd2.txt": ("ren_sd2_mem219.txt", [1, 0, 2]),
    "sail.jsonl": ("sail_sd2_mem.jsonl", [0, 1, 2]),
    "sail_nmem.txt": ("sail_sd2_nmem.txt", [0, 1]),
    "membench.csv": ("membench_SD1_final.csv", [0, 1, 3]),  # one URL; a list of four
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """The prompt files and every image they name, on 127.0.0.1; the stand-in metric weights."""
    weights = write_metric_weights(tmp_path_factory.mktemp("weights"))
    holder: dict[str, bytes] = {}
    routes = [(f"/img/{re.escape(DEAD)}/.*", status(404)),
              (r"/img/.*", lambda h, n: h.send_file(png(int(hashlib.sha256(h.path.encode()).hexdigest()[:6], 16)),
                                                       "image/png")),
              (r"/files/(.*)", lambda h, n: h.send_file(holder[h.path.rsplit("/", 1)[1]]))]
    with serve(routes) as server:
        for name, (fixture, keep) in FILES.items():
            holder[name] = _local(_lines(fixture, keep), server.url).encode()
        yield server, holder, weights


def _source(key: str, server, holder: dict[str, bytes], name: str) -> list[str]:
    return [f"sources.{key}.url={server.url}/files/{name}",
            f"sources.{key}.sha256={hashlib.sha256(holder[name]).hexdigest()}"]


def _scenario(scenario: str, tiny_model_dir: Path, tmp_path: Path, weights: dict, *extra: str,
              fid: bool = False) -> list[str]:
    return [f"scenario={scenario}", f"model.path={tiny_model_dir}", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}", "images_per_prompt=1",
            "sampler.steps=2", "resolution=32", "progress=false", "threads=1", "fetch.workers=4", "fetch.retries=0",
            "fetch.timeout=5", *paper_metric_overrides(weights), *([] if fid else ["metrics.fid=null"]), *extra]


def _fetch_and_run(overrides: list[str], only: list[str], scenario: str, tmp_path: Path) -> tuple[dict, pd.DataFrame]:
    fetch(compose_config([*overrides, f"fetch.only=[{','.join(only)}]"]))
    run(compose_config(overrides))
    folder = tmp_path / "out" / "runs" / scenario / "none"
    return (json.loads((folder / "metrics.json").read_text()),
            pd.read_csv(folder / "generations.csv", dtype={"reference_key": str}))


def _groups_everywhere(metrics: dict, memorized: list[str], control: str = "unmemorized") -> None:
    """Every aggregate split by group, detection memorized vs control, and the cost section."""
    assert set(metrics["alignment"]["groups"]) == {*memorized, control}
    if "fid" in metrics:  # nemo500 only (each FID costs seconds): the groups of at least 2 images
        assert set(metrics["fid"]["groups"]) <= {*memorized, control} and control in metrics["fid"]["groups"]
    assert set(metrics["similarity"]["groups"]) == set(memorized)  # the control prompts have no references
    assert set(metrics["transition"]["groups"]) == {*memorized, control}
    detection = metrics["detection"]
    assert detection["labels"] == f"group ({', '.join(memorized)} vs {control})"
    assert 0 <= detection["detection_first"]["auc"] <= 1 and detection["n_negative"] > 0
    assert set(detection["groups"]) == set(memorized)
    cost = metrics["cost"]
    assert cost["control"][control]["alignment"] == metrics["alignment"]["groups"][control]["mean"]
    if "fid" in metrics:
        assert cost["control"][control]["fid"] == metrics["fid"]["groups"][control]["value"]
    else:
        assert "fid" not in cost["control"][control]
    assert set(cost["memorized"]) == set(memorized)
    for group in memorized:
        assert cost["memorized"][group]["similarity_mean"] == metrics["similarity"]["groups"][group]["mean"]


def test_nemo500_groups_controls_and_references_from_urls(site, tiny_model_dir: Path, tmp_path: Path) -> None:
    server, holder, weights = site
    overrides = _scenario("nemo500", tiny_model_dir, tmp_path, weights,
                          *_source("prompts_file", server, holder, "nemo.csv"),
                          *_source("control_prompts_file", server, holder, "nemo_unmemorized.csv"), fid=True)
    metrics, gens = _fetch_and_run(overrides, ["prompts_file", "control_prompts_file", "references"], "nemo500",
                                   tmp_path)
    assert gens.group.tolist() == ["verbatim", "template", "verbatim", "unmemorized", "unmemorized"]
    assert gens.prompt[2] == '"Listen: The Lanterns\' New Single, ""Blue Morning (1992)"""' and gens.prompt_idx[3] == 3
    assert [n.split("/")[0] for n in gens.nearest_reference[:3]] == ["1000000001", "2000000002", "500000004"]
    assert gens.similarity[3:].isna().all() and metrics["similarity"]["controls_not_compared"] == 2
    assert "prompts_without_references" not in metrics["similarity"]
    _groups_everywhere(metrics, ["verbatim", "template"])
    notes = check_inputs(compose_config(overrides)).notes
    assert any(n.startswith("prompts: 3 from") for n in notes) and any(n.startswith("control prompts: 2 from") for n in notes)
    assert "groups: verbatim 2, template 1, unmemorized 2" in notes


def test_ren_sd1_345_joins_webster_indices_and_uses_its_ground_truth(site, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    server, holder, weights = site
    overrides = _scenario("ren_sd1_345", tiny_model_dir, tmp_path, weights,
                          *_source("prompts_file", server, holder, "ren_sd1.txt"),
                          *_source("control_prompts_file", server, holder, "ren_nomem.txt"),
                          *_source("prompt_join", server, holder, "wen.jsonl"))
    gt = tmp_path / "data" / "webster500" / "gt_images"
    for n, index in enumerate(("1000000001", "2000000002", "500000004")):  # webster500's folders, made here
        (gt / index).mkdir(parents=True)
        (gt / index / "0.png").write_bytes(png(300 + n, (48, 40)))
    metrics, gens = _fetch_and_run(overrides, ["prompts_file", "control_prompts_file", "prompt_join"],
                                   "ren_sd1_345", tmp_path)
    assert gens.group.tolist() == ["memorized"] * 3 + ["unmemorized"] * 2
    assert gens.reference_key[:3].tolist() == ["1000000001", "2000000002", "500000004"]
    assert gens.reference_key[3:].isna().all()
    _groups_everywhere(metrics, ["memorized"])


def test_sail_and_ren_sd2_share_sails_file_and_a_dead_link_is_counted(site, tiny_model_dir: Path,
                                                                       tmp_path: Path, capsys) -> None:
    server, holder, weights = site
    first = json.loads(holder["sail.jsonl"].splitlines()[0])
    dead = re.sub(r"/img/[^/]+/", f"/img/{DEAD}/", first["url"])
    holder["sail_dead.jsonl"] = b"\n".join([json.dumps({**first, "url": dead}, separators=(",", ":")).encode(),
                                            *holder["sail.jsonl"].splitlines()[1:]]) + b"\n"
    sail = _scenario("sail_sd2_219", tiny_model_dir, tmp_path, weights,
                     *_source("prompts_file", server, holder, "sail_dead.jsonl"),
                     *_source("control_prompts_file", server, holder, "sail_nmem.txt"))
    metrics, gens = _fetch_and_run(sail, ["prompts_file", "control_prompts_file", "references"], "sail_sd2_219",
                                   tmp_path)
    assert "2 of 3 prompts have a reference; 1 dead" in capsys.readouterr().out
    assert gens.group.tolist() == ["verbatim", "template", "template", "unmemorized", "unmemorized"]
    assert metrics["similarity"]["prompts_without_references"] == 1
    assert metrics["similarity"]["reference_keys_missing"] == ["1900000001"]
    assert set(metrics["similarity"]["groups"]) == {"template"}  # verbatim's one prompt lost its reference
    warnings = check_inputs(compose_config(sail)).warnings
    assert any("1 prompt(s) have no images in their own subfolder (1900000001" in w and "dead links" in w
               for w in warnings), warnings

    # Ren's SD 2 prompts: the same captions in another order, their index and url joined from SAIL's file
    ren = _scenario("ren_sd2_219", tiny_model_dir, tmp_path, weights,
                    *_source("prompts_file", server, holder, "ren_sd2.txt"),
                    *_source("control_prompts_file", server, holder, "ren_nomem.txt"),
                    *_source("prompt_join", server, holder, "sail_dead.jsonl"))
    metrics, gens = _fetch_and_run(ren, ["prompts_file", "control_prompts_file", "prompt_join", "references"],
                                   "ren_sd2_219", tmp_path)
    assert gens.reference_key.tolist()[:3] == ["1200000002", "1900000001", "1200000003"]
    assert gens.group.tolist() == ["memorized"] * 3 + ["unmemorized"] * 2
    assert metrics["similarity"]["prompts_without_references"] == 1
    _groups_everywhere(metrics, ["memorized"])


def test_membench3000_references_are_each_prompts_url_list(site, tiny_model_dir: Path, tmp_path: Path) -> None:
    server, holder, weights = site
    overrides = _scenario("membench3000", tiny_model_dir, tmp_path, weights,
                          *_source("prompts_file", server, holder, "membench.csv"))
    metrics, gens = _fetch_and_run(overrides, ["prompts_file", "references"], "membench3000", tmp_path)
    gt = tmp_path / "data" / "membench3000" / "gt_images"
    assert sorted(p.relative_to(gt).as_posix() for p in gt.rglob("*.png")) == ["0/0.png", "1/0.png", "1/1.png",
                                                                               "1/2.png", "1/3.png"]
    assert gens.reference_key.tolist() == ["0", "1"] and gens.group.tolist() == ["memorized"] * 2
    assert [n.split("/")[0] for n in gens.nearest_reference] == ["0", "1"]
    assert metrics["similarity"]["references"] == 5 and "cost" not in metrics


def test_webster500_gets_nemos_labels_by_caption(tmp_path: Path) -> None:
    data = tmp_path / "webster500"
    data.mkdir()
    wen = _lines("wen_sdv1_500_memorized.jsonl", [0, 1, 2, 3, 4])
    other = json.dumps({"caption": "A caption NeMo does not list", "index": 7, "url": "https://x.example/7.jpg"})
    (data / "sdv1_500_memorized.jsonl").write_text(wen + other + "\n", encoding="utf-8")
    overrides = ["scenario=webster500", f"paths.data_dir={tmp_path}"]
    without = load_prompts(compose_config(overrides))  # NeMo's file not there yet: no labels, a warning
    assert without.groups == [None] * 6 and "is not a file" in without.warnings[0]
    shutil.copy(FIXTURES / "nemo_memorized_laion_prompts.csv", data / "memorized_laion_prompts.csv")
    loaded = load_prompts(compose_config(overrides))
    assert loaded.groups == ["verbatim", "template", "verbatim", "verbatim", "verbatim", None]
    assert loaded.reference_keys[:2] == ["1000000001", "2000000002"] and loaded.fields[0]["type"] == "VM"
    assert loaded.warnings == ["1 of 6 prompt(s) of prompts_file="
                               f"{str(data / 'sdv1_500_memorized.jsonl')!r} are not in prompt_join.file="
                               f"{str(data / 'memorized_laion_prompts.csv')!r} (column 'Caption'): they keep no type"]


def test_an_unknown_label_value_names_the_file_column_and_value(tmp_path: Path) -> None:
    data = tmp_path / "nemo500"
    data.mkdir()
    text = (FIXTURES / "nemo_memorized_laion_prompts.csv").read_text(encoding="utf-8").replace(";TM;", ";XM;", 1)
    (data / "memorized_laion_prompts.csv").write_text(text, encoding="utf-8")
    shutil.copy(FIXTURES / "nemo_unmemorized_laion_prompts.csv", data / "unmemorized_laion_prompts.csv")
    with pytest.raises(UserError) as err:
        load_prompts(compose_config(["scenario=nemo500", f"paths.data_dir={tmp_path}"]))
    message = str(err.value)
    assert "\n" not in message and f"prompts_file={str(data / 'memorized_laion_prompts.csv')!r}" in message
    assert "column 'type' of prompt 1 holds 'XM'" in message and "add XM: <group> to group_labels" in message


def test_a_control_file_without_a_prompt_column_is_one_line_naming_it(tmp_path: Path) -> None:
    data = tmp_path / "nemo500"
    data.mkdir()
    shutil.copy(FIXTURES / "nemo_memorized_laion_prompts.csv", data / "memorized_laion_prompts.csv")
    (data / "unmemorized_laion_prompts.csv").write_text(";Title;URL;Index\n0;A quiet lane;https://x.example/a.jpg;1\n")
    report = check_inputs(compose_config(["scenario=nemo500", f"paths.data_dir={tmp_path}", "evaluate=false"]))
    line = next(p for p in report.problems if "unmemorized_laion_prompts.csv" in p)
    assert line.startswith(f"control_prompts_file={str(data / 'unmemorized_laion_prompts.csv')!r} has no prompt column")
    assert "name its prompt column prompt, caption or text" in line and "prompt_column" not in line
    assert "memguard fetch" in line and "unmemorized_laion_prompts.csv of the same repository" in line
    assert "\n" not in line


def test_check_names_both_prompt_files_when_neither_is_there(tmp_path: Path) -> None:
    report = check_inputs(compose_config(["scenario=ren_sd1_345", f"paths.data_dir={tmp_path}", "evaluate=false"]))
    lines = [p for p in report.problems if "prompts_file=" in p]
    assert lines[0].startswith(f"prompts_file={str(tmp_path / 'ren_sd1_345' / 'sd1_mem345.txt')!r} is not a file")
    assert lines[1].startswith(f"control_prompts_file={str(tmp_path / 'ren_sd1_345' / 'group_nomem500.txt')!r} is "
                               "not a file") and "prompt/group_nomem500.txt of github.com/renjie3/MemAttn" in lines[1]


def test_control_prompts_keep_the_memorized_prompts_indices(tmp_path: Path) -> None:
    base = ["scenario=custom", f"prompts_file={FIXTURES / 'ren_sd1_mem345.txt'}", "prompts_group=memorized"]
    alone = load_prompts(compose_config(base))
    both = load_prompts(compose_config([*base, f"control_prompts_file={FIXTURES / 'ren_group_nomem500.txt'}"]))
    assert both.texts[:len(alone.texts)] == alone.texts and both.n_controls == 4
    assert both.groups == ["memorized"] * 5 + ["unmemorized"] * 4 and both.reference_keys == [None] * 9
    with pytest.raises(UserError, match="control_group=memorized is also the group"):
        load_prompts(compose_config([*base, f"control_prompts_file={FIXTURES / 'ren_group_nomem500.txt'}",
                                     "control_group=memorized"]))
    assert np.array_equal(load_prompts(compose_config([*base, "control_prompts_file=null"])).texts, alone.texts)
