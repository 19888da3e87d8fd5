"""Every paper scenario end to end on rehearsal data in its real layout (mixed sizes, modes and formats,
awkward captions): tiny random model, a few steps, pixel metrics; and the paper's SSCD / CLIP / Inception
code paths on stand-in networks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from memguard.runner import run
from tests.rehearsal import paper_metric_overrides, write_metric_weights, write_rehearsal_data
from tests.test_configs import compose_config

REFERENCES = {"laion10k": 10, "laion100k": 10, "imagenette": 6, "wen_dup200": 3, "webster500": 9}
PROMPTS = {"laion10k": 10, "laion100k": 10, "imagenette": 10, "wen_dup200": 3, "webster500": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rehearsal_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_metric_weights(tmp_path_factory.mktemp("weights"))


def _overrides(scenario: str, model: Path, data: Path, out: Path) -> list[str]:
    return [f"scenario={scenario}", f"model.path={model}", f"paths.data_dir={data}", f"paths.output_dir={out}",
            "images_per_prompt=1", "sampler.steps=2", "resolution=32", "progress=false", "threads=1",
            "prompt_draw=null"]  # every caption once (laion10k draws 10,000 by default)


@pytest.mark.parametrize("scenario", REFERENCES)
def test_scenario_runs_end_to_end_on_rehearsal_data(scenario: str, data: Path, tiny_model_dir: Path,
                                                    tmp_path: Path) -> None:
    metrics = run(compose_config([*_overrides(scenario, tiny_model_dir, data, tmp_path), "metrics=pixel"]))
    assert metrics["n_images"] == PROMPTS[scenario]
    assert metrics["similarity"]["references"] == REFERENCES[scenario]
    gens = pd.read_csv(tmp_path / "runs" / scenario / "none" / "generations.csv")
    assert gens.similarity.notna().all() and gens.similarity.between(-1, 1).all()
    if scenario == "webster500":  # each prompt against its own ground-truth folder only
        assert [n.split("/")[0] for n in gens.nearest_reference] == [str(k) for k in gens.reference_key]
        assert gens.prompt[1] == '""Mona Lisa"" by Leonardo da Vinci, oil on poplar'


@pytest.mark.parametrize("scenario", ["webster500", "laion10k"])
def test_paper_metrics_code_paths_on_mixed_references(scenario: str, data: Path, weights: dict[str, Path],
                                                      tiny_model_dir: Path, tmp_path: Path) -> None:
    run(compose_config([*_overrides(scenario, tiny_model_dir, data, tmp_path), *paper_metric_overrides(weights)]))
    metrics = json.loads((tmp_path / "runs" / scenario / "none" / "metrics.json").read_text())
    assert metrics["similarity"]["embedder"] == "sscd[sscd_stand_in.torchscript.pt, dcr]"
    assert metrics["similarity"]["references"] == REFERENCES[scenario]
    assert metrics["alignment"]["scorer"] == "clip[mg-tiny-clip, tiny_clip.bin]"
    assert metrics["fid"]["kind"] == "fid" and math.isfinite(metrics["fid"]["value"])
    assert metrics["fid"]["references"] == REFERENCES[scenario]
