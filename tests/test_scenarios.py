"""The paper's scenarios: configs compose, and their loaders read fixtures written in the datasets' own formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.errors import UserError
from memguard.evaluate import evaluate
from memguard.runner import run
from memguard.runs.prompts import load_prompts
from tests.test_configs import compose_config

PAPER_SCENARIOS = {"laion10k": 256, "laion100k": 256, "imagenette": 256, "wen_dup200": None, "webster500": None}


@pytest.mark.parametrize(("scenario", "resolution"), PAPER_SCENARIOS.items())
def test_paper_scenarios_compose_with_their_settings(scenario: str, resolution: int | None) -> None:
    cfg = compose_config([f"scenario={scenario}", "paths.data_dir=/data", "paths.models_dir=/models"])
    assert cfg.scenario.name == scenario and cfg.resolution == resolution
    assert cfg.model.path.startswith("/models/") and cfg.sampler.name == "dpm" and cfg.sampler.steps == 50
    assert cfg.guidance.scale == 7.5
    assert (cfg.prompts is None) != (cfg.prompts_file is None)


def test_imagenette_prompts_are_the_papers_template() -> None:
    prompts = load_prompts(compose_config(["scenario=imagenette"])).texts
    assert len(prompts) == 10 and prompts[0] == "An image of tench" and "An image of parachute" in prompts


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def test_laion_metadata_jsonl_gives_captions_and_reference_images(tmp_path: Path) -> None:
    data = tmp_path / "laion10k"
    rows = [{"file_name": f"images/{i:05d}.jpg", "text": f"caption {i}"} for i in range(3)]
    (data / "images").mkdir(parents=True)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(["scenario=laion10k", f"paths.data_dir={tmp_path}", "prompt_draw=null"])
    assert load_prompts(cfg).texts == ["caption 0", "caption 1", "caption 2"]
    drawn = load_prompts(compose_config(["scenario=laion10k", f"paths.data_dir={tmp_path}"])).texts
    assert len(drawn) == 10000 and set(drawn) == {"caption 0", "caption 1", "caption 2"}  # the official draw
    assert Path(cfg.references) == data  # every image under the folder: images/ here, train/ in DCR's layout


def write_webster_fixture(root: Path, run_images: Path) -> None:
    """sdv1_500_memorized.jsonl (caption, index, url) and gt_images/{index}/*.png: prompt 0's folder holds a copy
    of one of its generations, prompt 1's holds only unrelated images."""
    data = root / "webster500"
    lines = [{"caption": "a cat", "index": 7, "url": "http://x/7.jpg"},
             {"caption": "a dog", "index": 12, "url": "http://x/12.jpg"}]
    data.mkdir(parents=True)
    (data / "sdv1_500_memorized.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (data / "gt_images" / "7").mkdir(parents=True)
    shutil.copy(run_images / "00000_0.png", data / "gt_images" / "7" / "0.png")
    _image(data / "gt_images" / "7" / "1.png", 10)
    _image(data / "gt_images" / "12" / "0.png", 200)


def test_webster500_scores_each_prompt_against_its_own_ground_truth(tiny_model_dir: Path, tmp_path: Path) -> None:
    overrides = ["scenario=webster500", f"model.path={tiny_model_dir}", f"paths.data_dir={tmp_path / 'data'}",
                 "images_per_prompt=1", "sampler.steps=4", f"run_dir={tmp_path / 'run'}", "progress=false",
                 "metrics=pixel", f"paths.cache_dir={tmp_path / 'cache'}"]
    # the ground truth of prompt 0 is one of its own generations: make the images first, then the fixture
    first = tmp_path / "first"
    run(compose_config([*overrides[1:4], "scenario=custom", "prompts=[a cat]", "images_per_prompt=1",
                        "sampler.steps=4", f"run_dir={first}", "progress=false"]))
    write_webster_fixture(tmp_path / "data", first / "images")
    run(compose_config(overrides))
    gens = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert gens.reference_key.tolist() == [7, 12]
    assert gens.nearest_reference.tolist() == ["7/0.png", "12/0.png"]  # never another prompt's image
    assert gens.similarity[0] == pytest.approx(1.0, abs=1e-5)

    (tmp_path / "data" / "webster500" / "gt_images" / "12" / "0.png").unlink()  # prompt 12 left without ground truth
    metrics = evaluate(compose_config(overrides))
    assert metrics["similarity"]["prompts_without_references"] == 1
    assert metrics["similarity"]["reference_keys_missing"] == ["12"]
    assert metrics["similarity"]["reference_coverage"] == {"with": 1, "of": 2}
    from memguard.tables import notes

    assert "Similarity: 1 of 2 prompts have references" in " ".join(notes({"none": metrics}, True))
    gens = pd.read_csv(tmp_path / "run" / "generations.csv")
    assert gens.similarity[0] == pytest.approx(1.0, abs=1e-5) and np.isnan(gens.similarity[1])
    assert metrics["similarity"]["mean"] == pytest.approx(1.0, abs=1e-5)  # over the prompts that have references
    for key in ("7", "12"):
        shutil.rmtree(tmp_path / "data" / "webster500" / "gt_images" / key, ignore_errors=True)
    (tmp_path / "data" / "webster500" / "gt_images" / "other").mkdir()
    (tmp_path / "data" / "webster500" / "gt_images" / "other" / "0.png").write_bytes(
        (first / "images" / "00000_0.png").read_bytes())
    with pytest.raises(UserError, match="no images in the subfolder.* 12"):  # none has: an error
        evaluate(compose_config(overrides))


def test_missing_reference_field_names_the_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"caption": "a cat", "index": 1}\n{"caption": "a dog"}\n')
    cfg = compose_config(["scenario=custom", f"prompts_file={prompts}", "references_per_prompt=index"])
    with pytest.raises(UserError, match="line 2 has no field 'index'"):
        load_prompts(cfg)
