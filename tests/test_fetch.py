"""memguard fetch against servers on 127.0.0.1 only (no other network): a fake hub, an image and file server
with awkward responses, a zip standing in for the Drive archive. What is not tested here: Google Drive itself
(its confirmation page and folder listing; the gdrive kind is tested through gdown's plain-URL path), and the
real hosts' files (hashes and revisions recorded at the first real fetch)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memguard.errors import UserError
from tests.fetch_servers import COMMIT, fail_first, hub_routes, redirect, serve, slow, static, status
from tests.rehearsal import write_metric_weights
from tests.test_cli import memguard_here

INDICES = (3, 11, 23)  # the prompts' `index` values: one ground-truth folder each


def png(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def mg(*args: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The memguard command as a user runs it, from this worktree, with the network limited to 127.0.0.1."""
    root = Path(__file__).resolve().parents[1]
    base = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "0", "HF_HOME": str(cwd / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    return subprocess.run([sys.executable, "-m", "memguard.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=timeout)


Site = namedtuple("Site", "server files weights")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """Every webster500 + metrics=paper input, served: the tiny model as test/tiny-sd on a fake hub, the tiny CLIP
    as test/tiny-clip, the prompt file, the ground-truth zip, SSCD and Inception stand-ins."""
    root = tmp_path_factory.mktemp("site")
    weights = write_metric_weights(root / "weights")
    clip_repo = root / "clip-repo"
    clip_repo.mkdir()
    shutil.copy(weights["clip"], clip_repo / "open_clip_pytorch_model.bin")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for n, index in enumerate(INDICES):
            for j in range(1 + n % 2):
                z.writestr(f"gt_images/{index}/{j}.png", png(10 * n + j, (64 + 8 * j, 48)))
        z.writestr("README.txt", "ground truth")
    files = {
        "prompts.jsonl": "".join(json.dumps({"caption": f"prompt {i} – ünïcode", "index": i,
                                             "url": f"/img/{i}.png"}, ensure_ascii=False) + "\n" for i in INDICES).encode(),
        "gt.zip": archive.getvalue(),
        "labels.csv": (";Caption;URL;type;mean_sscd;max_sscd;Index\n" + "".join(  # NeMo's labels of two captions
            f"{n};prompt {i} – ünïcode;/img/{i}.png;{t};0.5;0.6;{i}\n"
            for n, (i, t) in enumerate(zip(INDICES, ("VM", "TM"))))).encode(),
        "sscd.pt": weights["sscd"].read_bytes(),
        "inception.pth": weights["inception"].read_bytes(),
    }
    routes = [*hub_routes("test/tiny-sd", tiny_model_dir), *hub_routes("test/tiny-clip", clip_repo)]
    routes += [(f"/files/{name}", static(data)) for name, data in files.items()]
    routes += [(f"/img/{i}.png", static(png(100 + i), "image/png")) for i in INDICES]
    with serve(routes) as server:
        yield Site(server, files, weights)


def webster_overrides(site: Site, tmp: Path) -> list[str]:
    """webster500 + metrics=paper, every source pointed at the local servers, every folder under ``tmp``."""
    u, f = site.server.url, site.files
    return ["scenario=webster500", "metrics=paper", f"paths.data_dir={tmp / 'data'}",
            f"paths.models_dir={tmp / 'models'}", f"paths.weights_dir={tmp / 'weights'}",
            f"paths.output_dir={tmp / 'out'}",
            "sources.model.repo=test/tiny-sd", f"sources.model.revision={COMMIT}",
            f"sources.prompts_file.url={u}/files/prompts.jsonl",
            f"sources.prompts_file.sha256={hashlib.sha256(f['prompts.jsonl']).hexdigest()}",
            f"sources.prompt_join.url={u}/files/labels.csv",
            f"sources.prompt_join.sha256={hashlib.sha256(f['labels.csv']).hexdigest()}",
            f"sources.references.url={u}/files/gt.zip",
            f"sources.similarity.url={u}/files/sscd.pt",
            "sources.alignment.repo=test/tiny-clip",
            f"sources.fid.url={u}/files/inception.pth",
            f"sources.fid.sha256_prefix={hashlib.sha256(f['inception.pth']).hexdigest()[:8]}",
            "metrics.alignment.model=mg-tiny-clip", f"+metrics.alignment.model_config={site.weights['clip_config']}",
            "device=cpu", "fetch.timeout=5", "fetch.retries=1", "fetch.backoff=0.05"]


@pytest.mark.slow
def test_fetch_webster500_then_check_and_run(site: Site, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": site.server.url}
    overrides = webster_overrides(site, tmp_path)
    dry = mg("fetch", *overrides, "fetch.dry_run=true", cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in dry.stdout and "dry run" in dry.stdout
    assert not (tmp_path / "models").exists() and not (tmp_path / "data").exists()  # a dry run writes nothing

    result = mg("fetch", *overrides, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    model = tmp_path / "models" / "stable-diffusion-v1-4"
    assert (model / "unet" / "config.json").is_file() and (model / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "data" / "webster500" / "gt_images").iterdir()) == sorted(map(str, INDICES))
    assert (tmp_path / "weights" / "ViT-g-14.bin").read_bytes() == site.weights["clip"].read_bytes()
    models_manifest = json.loads((tmp_path / "models" / "manifest.json").read_text())
    assert models_manifest["sources"]["model"]["test/tiny-sd"]["revision"] == COMMIT
    entry = models_manifest["files"]["stable-diffusion-v1-4/unet/config.json"]
    assert entry["revision"] == COMMIT and entry["bytes"] == (model / "unet" / "config.json").stat().st_size
    data_manifest = json.loads((tmp_path / "data" / "webster500" / "manifest.json").read_text())
    assert "gt_images/3/0.png" in data_manifest["files"]
    assert "sha256" in data_manifest["sources"]["references"][f"{site.server.url}/files/gt.zip"]
    assert not list(tmp_path.rglob("*.part"))

    hits = sum(site.server.hits.values())
    again = mg("fetch", *overrides, cwd=tmp_path, env=env)  # nothing to do: says so, asks no server
    assert again.returncode == 0 and "nothing to fetch" in again.stdout, again.stdout + again.stderr
    assert sum(site.server.hits.values()) == hits

    # run, evaluate and check read only the fetched folders: in this process (memguard_here); fetch in its own
    run = memguard_here("run", *overrides, "images_per_prompt=1", "sampler.steps=2", "progress=false", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]  # memguard check passed first (every run begins with it)
    metrics = json.loads((tmp_path / "out" / "runs" / "webster500" / "none" / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and "similarity" in metrics and "fid" in metrics
    assert set(metrics["similarity"]["groups"]) == {"verbatim", "template"}  # NeMo's labels; prompt 23 has none
    run_dir = tmp_path / "out" / "runs" / "webster500" / "none"
    (run_dir / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "similarity"}))
    evaluated = memguard_here("evaluate", *overrides, f"run_dir={run_dir}", cwd=tmp_path)  # on the fetched folders
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "similarity" in json.loads((run_dir / "metrics.json").read_text())

    # a fetched file changed, one removed: check names them, fetch fetches them again
    (model / "unet" / "config.json").write_text("{}")
    (tmp_path / "data" / "webster500" / "gt_images" / "11" / "0.png").unlink()
    check = memguard_here("check", *overrides, cwd=tmp_path)
    assert check.returncode == 2
    assert "stable-diffusion-v1-4/unet/config.json changed" in check.stderr
    assert "gt_images/11/0.png removed" in check.stderr
    refetch = mg("fetch", *overrides, cwd=tmp_path, env=env)
    assert refetch.returncode == 0, refetch.stderr
    assert json.loads((model / "unet" / "config.json").read_text()) != {}
    assert (tmp_path / "data" / "webster500" / "gt_images" / "11" / "0.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# In process: files over HTTP, image URL lists, refusals


def compose(overrides: list[str]):
    from tests.test_configs import compose_config

    return compose_config(overrides)


BIG = np.random.default_rng(7).integers(0, 256, 30 * 2**20, dtype=np.uint8).tobytes()  # a 30 MB file


@pytest.fixture(scope="module")
def files_server():
    """Files with awkward responses (paths under /f/)."""
    jpeg = png(1, (80, 60), "JPEG")
    routes = [
        ("/f/big.bin", static(BIG)),
        ("/f/big-cut.bin", lambda h, n: h.send_file(BIG, cut_at=12 * 2**20 if n == 0 else None)),
        ("/f/flaky.bin", fail_first(2, 500, static(b"flaky ok"))),
        ("/f/hop1", redirect("/f/hop2")), ("/f/hop2", redirect("/f/hop3")), ("/f/hop3", static(b"after hops")),
        ("/f/gone.bin", status(404)),
        ("/f/slow.bin", slow(1.5, static(b"too late"))),
        # images for a URL list
        ("/i/rgb.png", static(png(2, (64, 48)), "image/png")),
        ("/i/photo.jpg", static(jpeg, "image/jpeg")),
        ("/i/gray.webp", static(png(3, (30, 70), "WEBP", "L"), "image/webp")),
        ("/i/pal.gif", static(png(4, (20, 20), "GIF", "P"), "image/gif")),
        ("/i/flaky.png", fail_first(1, 500, static(png(5), "image/png"))),
        ("/i/hop", redirect("/i/rgb.png")),
        ("/i/dead.png", status(404)),
        ("/i/page.png", static(b"<html><body>Image not found</body></html>", "text/html")),
        ("/i/cut.jpg", static(jpeg[: len(jpeg) // 2], "image/jpeg")),
        ("/i/slow.png", slow(1.5, static(png(6), "image/png"))),
        ("/i/a photo é.png", static(png(8, (33, 33)), "image/png")),
    ]
    with serve(routes) as server:
        yield server


def test_download_retries_redirects_refuses_404_and_times_out(files_server, tmp_path: Path) -> None:
    from memguard.fetch.http import FetchError, download

    u = files_server.url
    assert download(f"{u}/f/flaky.bin", tmp_path / "flaky.bin", retries=3, backoff=0.01) == hashlib.sha256(b"flaky ok").hexdigest()
    assert files_server.hits["/f/flaky.bin"] == 3  # two 500s retried
    download(f"{u}/f/hop1", tmp_path / "hops.bin", backoff=0.01)
    assert (tmp_path / "hops.bin").read_bytes() == b"after hops"
    with pytest.raises(FetchError, match="HTTP 404"):
        download(f"{u}/f/gone.bin", tmp_path / "gone.bin", retries=3, backoff=0.01)
    assert files_server.hits["/f/gone.bin"] == 1  # a 404 is not retried
    with pytest.raises(FetchError, match="timed out"):
        download(f"{u}/f/slow.bin", tmp_path / "slow.bin", timeout=0.3, retries=1, backoff=0.01)
    assert not (tmp_path / "gone.bin").exists() and not (tmp_path / "slow.bin").exists()


def test_interrupted_download_resumes_with_range(files_server, tmp_path: Path) -> None:
    from memguard.fetch.http import FetchError, download

    dest = tmp_path / "big.bin"
    with pytest.raises(FetchError, match="kept to resume"):  # the server closes the connection at 12 MB
        download(f"{files_server.url}/f/big-cut.bin", dest, retries=0)
    assert not dest.exists() and (tmp_path / "big.bin.part").stat().st_size == 12 * 2**20
    digest = download(f"{files_server.url}/f/big-cut.bin", dest, retries=0,
                      sha256=hashlib.sha256(BIG).hexdigest())  # the same command again: resumes from 12 MB
    assert digest == hashlib.sha256(BIG).hexdigest() and dest.read_bytes() == BIG
    assert not (tmp_path / "big.bin.part").exists()


def test_checksum_mismatch_is_refused_and_stays_part(files_server, tmp_path: Path) -> None:
    from memguard.fetch.http import download

    wrong = "0" * 64
    with pytest.raises(UserError) as err:
        download(f"{files_server.url}/f/hop3", tmp_path / "x.bin", sha256=wrong)
    text = str(err.value)
    assert "x.bin" in text and wrong in text and hashlib.sha256(b"after hops").hexdigest() in text
    assert not (tmp_path / "x.bin").exists() and (tmp_path / "x.bin.part").is_file()


def url_list_setup(server, tmp_path: Path, rows: list[tuple[object, str]]) -> list[str]:
    """A webster500 prompt file whose `url`s are ``rows`` (index, path) on ``server``; references by url_list."""
    data = tmp_path / "data" / "webster500"
    data.mkdir(parents=True)
    (data / "sdv1_500_memorized.jsonl").write_text("".join(
        json.dumps({"caption": f"caption {n}", "index": i, "url": server.url + p}, ensure_ascii=False) + "\n"
        for n, (i, p) in enumerate(rows)), encoding="utf-8")
    return ["scenario=webster500", "metrics=sscd", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.models_dir={tmp_path / 'models'}", "fetch.only=[references]", "sources.references.kind=url_list",
            "fetch.timeout=0.5", "fetch.retries=1", "fetch.backoff=0.01", "fetch.workers=4", "fetch.per_host=2"]


def test_url_list_fetches_verifies_and_reports_dead_links(files_server, tmp_path: Path, capsys) -> None:
    from memguard.check import check_inputs
    from memguard.fetch.command import fetch

    good = [(0, "/i/rgb.png"), (1, "/i/photo.jpg"), (2, "/i/gray.webp"), (3, "/i/pal.gif"), (4, "/i/flaky.png"),
            (5, "/i/hop"), (6, "/i/a photo é.png"), (6, "/i/rgb.png")]
    dead = [(7, "/i/dead.png"), (8, "/i/page.png"), (9, "/i/cut.jpg"), (10, "/i/slow.png")]
    overrides = url_list_setup(files_server, tmp_path, good + dead)
    before = files_server.hits.get("/i/rgb.png", 0)
    fetch(compose(overrides))
    out = capsys.readouterr().out
    assert files_server.hits["/i/rgb.png"] - before == 2  # asked once for prompts 0 and 6, once through /i/hop
    assert "7 of 11 prompts have a reference; 4 dead:" in out and "fetch_report.csv" in out
    gt = tmp_path / "data" / "webster500" / "gt_images"
    assert sorted((p.relative_to(gt).as_posix() for p in gt.rglob("*.png")), key=str) == sorted(
        ["0/0.png", "1/0.png", "2/0.png", "3/0.png", "4/0.png", "5/0.png", "6/0.png", "6/1.png"])
    with Image.open(gt / "2" / "0.png") as image:  # stored as PNG, RGB, at its own size
        assert image.mode == "RGB" and image.size == (30, 70)
    import csv

    with open(tmp_path / "data" / "webster500" / "fetch_report.csv", newline="") as handle:
        rows = {r["key"]: (r["url"].rsplit("/", 1)[1], r["status"]) for r in csv.DictReader(handle)}
    assert rows["7"] == ("dead.png", "HTTP 404") and rows["8"][1].startswith("not an image (text/html")
    assert rows["9"][1].startswith("not an image (image/jpeg") and rows["10"] == ("slow.png", "ReadTimeout")
    assert len(rows) == 4
    assert not list(gt.rglob("*.tmp"))

    cfg = compose(overrides)
    report = check_inputs(cfg)  # the prompts left without references are named (evaluation leaves them out)
    assert any("7 of 11 prompts have references; 4 prompt(s) have no images in their own subfolder (10, 7, 8, 9" in w and "dead links" in w
               for w in report.warnings), report.warnings
    hits = dict(files_server.hits)
    start = time.monotonic()
    fetch(compose(overrides))  # dead links are not tried again: nothing to do
    assert "nothing to fetch" in capsys.readouterr().out and time.monotonic() - start < 5
    assert files_server.hits == hits


def test_destinations_that_leave_the_folder_are_refused(files_server, tmp_path: Path) -> None:
    from memguard.fetch.command import fetch
    from memguard.fetch.http import unpack

    overrides = url_list_setup(files_server, tmp_path, [(0, "/i/rgb.png"), ("../../evil", "/i/rgb.png")])
    hits = sum(files_server.hits.values())
    with pytest.raises(UserError, match="'../../evil/0.png' would leave"):
        fetch(compose(overrides))
    assert sum(files_server.hits.values()) == hits  # refused before any request
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("gt_images/1/0.png", png(1))
        z.writestr("../outside.png", png(2))
    with pytest.raises(UserError, match="would leave"):
        unpack(archive, "zip", "gt_images", tmp_path / "gt", "references")
    assert not (tmp_path / "outside.png").exists() and not (tmp_path / "gt").exists()


def test_not_enough_disk_is_refused_before_the_first_byte(files_server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from memguard.fetch.command import fetch

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**6, 10**6))
    overrides = ["scenario=webster500", "metrics=paper", f"paths.weights_dir={tmp_path / 'w'}",
                 "fetch.only=[similarity]", f"sources.similarity.url={files_server.url}/f/big.bin"]
    with pytest.raises(UserError, match=r"not enough free disk: the sources announce 30.0 MiB, 976.6 KiB free"):
        fetch(compose(overrides))
    assert not (tmp_path / "w").exists()


def test_unreachable_sources_are_one_line_each(tmp_path: Path) -> None:
    from memguard.fetch.command import fetch

    closed = "http://127.0.0.1:9"  # the discard port: nothing listens
    overrides = ["scenario=webster500", "metrics=paper", f"paths.data_dir={tmp_path / 'd'}",
                 f"paths.weights_dir={tmp_path / 'w'}", "fetch.only=[prompts_file,similarity,fid]",
                 f"sources.prompts_file.url={closed}/p.jsonl", f"sources.similarity.url={closed}/s.pt",
                 f"sources.fid.url={closed}/i.pth", "fetch.timeout=1", "fetch.retries=0"]
    with pytest.raises(UserError) as err:
        fetch(compose(overrides))
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 source(s) not fetched") and len(lines) == 4
    assert all("could not be reached (connection refused)" in line for line in lines[1:]), lines
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()  # nothing half-written


def test_gdrive_kind_through_gdown_with_a_pinned_hash(files_server, tmp_path: Path) -> None:
    """The Drive kind's code path (gdown) on a plain URL: Drive itself cannot be reached here."""
    from memguard.fetch.command import fetch

    overrides = ["scenario=webster500", "metrics=paper", f"paths.weights_dir={tmp_path / 'w'}", "fetch.only=[similarity]",
                 "sources.similarity.kind=gdrive",
                 f"sources.similarity.url={files_server.url}/f/hop3", f"sources.similarity.sha256={'1' * 64}"]
    with pytest.raises(UserError, match="does not match the expected 1111"):
        fetch(compose(overrides))
    assert (tmp_path / "w" / "sscd_disc_large.torchscript.pt.part").is_file()


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_file_then_the_same_command_completes(tmp_path: Path) -> None:
    """SIGINT while a file streams: memguard says it was interrupted (exit 130), the bytes so far stay in
    ``.part`` and no finished file exists; the same command resumes with ``Range`` and the file is whole. A
    second run has nothing to fetch and asks the server nothing."""
    import threading

    from tests.rehearsal import write_random_inception

    data = write_random_inception(tmp_path / "inception.pth").read_bytes()
    half, release, gets = len(data) // 2, threading.Event(), []

    def trickle(handler, count: int) -> None:  # a GET stalls after half the file until released, then is whole
        if handler.command == "GET":
            gets.append(handler.headers.get("Range"))
        if handler.command == "HEAD" or release.is_set():
            return handler.send_file(data)
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        handler.wfile.write(data[:half])
        handler.wfile.flush()
        release.wait(60)  # until the test has interrupted the client
        handler.close_connection = True

    with serve([("/inception.pth", trickle)]) as server:
        overrides = ["scenario=webster500", "metrics=paper", f"paths.weights_dir={tmp_path / 'weights'}",
                     "fetch.only=[fid]", f"sources.fid.url={server.url}/inception.pth",
                     f"sources.fid.sha256_prefix={hashlib.sha256(data).hexdigest()[:8]}", "fetch.retries=0",
                     "fetch.timeout=100"]
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": str(root), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        dest = tmp_path / "weights" / "weights-inception-2015-12-05-6726825d.pth"
        part = dest.with_name(dest.name + ".part")
        process = subprocess.Popen([sys.executable, "-m", "memguard.cli", "fetch", *overrides], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120  # the client writes whole chunks: wait for most of the half
            while not (part.is_file() and part.stat().st_size >= half // 2) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert part.is_file() and process.poll() is None, process.poll()
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            release.set()
            process.kill()
        assert process.returncode == 130 and "memguard: interrupted" in err, err
        kept = part.stat().st_size
        assert half // 2 <= kept <= half and not dest.exists()  # nothing finished, the bytes so far kept
        assert part.read_bytes() == data[:kept]

        again = mg("fetch", *overrides, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert dest.read_bytes() == data and not part.exists()
        assert gets[-1] == f"bytes={kept}-"  # the same command resumed where the interrupted one stopped
        hits = server.hits["/inception.pth"]
        idle = mg("fetch", *overrides, cwd=tmp_path)
        assert idle.returncode == 0 and "nothing to fetch" in idle.stdout and server.hits["/inception.pth"] == hits
