"""scenario=coco_general: COCO-2017 validation captions drawn as MemBench draws them, fetched from a stand-in of
cocodataset.org's annotation archive on 127.0.0.1, then run with the tiny model, as its own run and as controls."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from memguard.errors import UserError
from memguard.fetch.derive import coco_captions
from tests.fetch_servers import serve, static
from tests.test_cli import memguard_here

# (image_id, id, caption) in the file's order: image 9 has two captions, the first one counts; image 3 comes
# first although its id is larger (MemBench keeps the file's order, it does not sort)
ANNOTATIONS = [(397133, 370, "A man is in a kitchen making pizzas."), (9, 1, "Closeup of bins of food."),
               (397133, 371, "Man in apron standing in front of oven."), (9, 2, "A meal in two containers."),
               (139, 88, "A room with chairs, a table, and a woman in it.\n")]
FIRST = ["A man is in a kitchen making pizzas.", "Closeup of bins of food.",
         "A room with chairs, a table, and a woman in it.\n"]


def annotation_zip() -> bytes:
    """annotations_trainval2017.zip's layout: annotations/captions_val2017.json beside other annotation files."""
    captions = {"info": {}, "images": [], "licenses": [],
                "annotations": [{"image_id": i, "id": n, "caption": c} for i, n, c in ANNOTATIONS]}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("annotations/captions_val2017.json", json.dumps(captions))
        z.writestr("annotations/captions_train2017.json", json.dumps({"annotations": []}))
        z.writestr("annotations/instances_val2017.json", "{}")
    return out.getvalue()


def test_the_draw_is_the_first_caption_of_each_image_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"annotations": [{"image_id": i, "id": n, "caption": c} for i, n, c in ANNOTATIONS]}))
    assert coco_captions(tmp_path, tmp_path / "out.jsonl") == 3
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == FIRST and [r["image_id"] for r in rows] == [397133, 9, 139]
    # MemBench's own expression on the same annotations gives the same captions, in the same order
    membench = pd.DataFrame([{"image_id": i, "id": n, "caption": c} for i, n, c in ANNOTATIONS]).drop_duplicates(
        subset="image_id")
    assert membench.caption.tolist() == FIRST
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="COCO's caption layout"):
        coco_captions(tmp_path, tmp_path / "out.jsonl")


@pytest.mark.slow
def test_fetch_coco_general_from_a_stand_in_then_run_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    with serve([("/annotations/annotations_trainval2017.zip", static(annotation_zip()))]) as server:
        overrides = ["scenario=coco_general", f"paths.data_dir={tmp_path / 'data'}", f"model.path={tiny_model_dir}",
                     f"sources.coco_annotations.url={server.url}/annotations/annotations_trainval2017.zip",
                     "fetch.timeout=5", "fetch.retries=1", "fetch.backoff=0.05"]
        fetched = memguard_here("fetch", *overrides, cwd=tmp_path)  # a URL source: in this process
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    data = tmp_path / "data" / "coco_general"
    assert sorted(p.name for p in (data / "annotations").iterdir()) == ["captions_val2017.json"]  # the captions only
    prompts = [json.loads(line)["caption"] for line in (data / "captions_val2017_first.jsonl").read_text().splitlines()]
    assert prompts == FIRST
    manifest = json.loads((data / "manifest.json").read_text())
    assert "annotations/captions_val2017.json" in manifest["files"]  # recorded: `memguard check` sees changes

    run = memguard_here("run", *overrides, "images_per_prompt=2", "sampler.steps=3", "metrics=none",
                       f"paths.output_dir={tmp_path / 'out'}", "progress=false", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    gens = pd.read_csv(tmp_path / "out" / "runs" / "coco_general" / "none" / "generations.csv")
    assert gens.prompt.drop_duplicates().tolist() == FIRST  # as written, as MemBench passes them
    assert set(gens.group) == {"general"} and len(gens) == 6

    # the same captions as the controls of another run on the same model (control_prompts_file)
    from memguard.runner import run as run_task
    from tests.test_run import config

    run_task(config(tiny_model_dir, tmp_path / "with-controls", "images_per_prompt=1",
                    f"control_prompts_file={data / 'captions_val2017_first.jsonl'}"))
    gens = pd.read_csv(tmp_path / "with-controls" / "generations.csv")
    assert gens[gens.group == "unmemorized"].prompt.tolist() == FIRST
    assert gens[gens.group != "unmemorized"].prompt.tolist() == ["a red circle", "a blue square"]
