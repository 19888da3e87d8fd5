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
from tests.rehearsal import TINY_CLIP, write_metric_weights

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
    assert models_manifest["sources"]["model"]["revision"] == COMMIT
    entry = models_manifest["files"]["stable-diffusion-v1-4/unet/config.json"]
    assert entry["revision"] == COMMIT and entry["bytes"] == (model / "unet" / "config.json").stat().st_size
    data_manifest = json.loads((tmp_path / "data" / "webster500" / "manifest.json").read_text())
    assert "gt_images/3/0.png" in data_manifest["files"] and "sha256" in data_manifest["sources"]["references"]
    assert not list(tmp_path.rglob("*.part"))

    check = mg("check", *overrides, cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    assert "every input of scenario=webster500 is present" in check.stdout

    again = mg("fetch", *overrides, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to fetch" in again.stdout, again.stdout + again.stderr

    run = mg("run", *overrides, "images_per_prompt=1", "sampler.steps=2", "progress=false", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "runs" / "webster500" / "none" / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and "similarity" in metrics and "fid" in metrics

    # a fetched file changed, one removed: check names them, fetch fetches them again
    (model / "unet" / "config.json").write_text("{}")
    (tmp_path / "data" / "webster500" / "gt_images" / "11" / "0.png").unlink()
    check = mg("check", *overrides, cwd=tmp_path, env=env)
    assert check.returncode == 2
    assert "stable-diffusion-v1-4/unet/config.json changed" in check.stderr
    assert "gt_images/11/0.png removed" in check.stderr
    refetch = mg("fetch", *overrides, cwd=tmp_path, env=env)
    assert refetch.returncode == 0, refetch.stderr
    assert mg("check", *overrides, cwd=tmp_path, env=env).returncode == 0
