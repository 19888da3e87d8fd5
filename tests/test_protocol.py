"""The protocol's options that follow the reference code: the prompt draw, the table configs' metric networks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from memguard.errors import UserError
from memguard.runner import run
from memguard.runs.prompts import Prompts, draw_prompts
from tests.test_run import config

CONF = Path(__file__).parent.parent / "conf"


def test_prompt_draw_is_the_official_numpy_draw_with_replacement() -> None:
    texts = [f"caption {i}" for i in range(50)]
    loaded = Prompts(texts, [None] * 50, [str(i) for i in range(50)])
    drawn = draw_prompts(loaded, OmegaConf.create({"count": 40, "seed": 42, "replace": True}))
    np.random.seed(42)  # as generate_test_dataset_stp.py lines 152-153 draw them
    assert drawn.texts == list(np.random.choice(texts, 40))
    assert len(set(drawn.texts)) < 40  # with replacement: repeats, each its own entry
    assert drawn.reference_keys == [t.split()[1] for t in drawn.texts]
    assert draw_prompts(loaded, None) is loaded
    assert sorted(draw_prompts(loaded, OmegaConf.create({"count": 50, "seed": 1, "replace": False})).texts) == sorted(texts)
    with pytest.raises(UserError, match="prompt_draw.count=60"):
        draw_prompts(loaded, OmegaConf.create({"count": 60, "seed": 1, "replace": False}))
    assert OmegaConf.load(CONF / "scenario" / "laion10k.yaml").prompt_draw == {"count": 10000, "seed": 42, "replace": True}


def test_a_run_with_a_prompt_draw_gives_a_repeated_prompt_its_own_index(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "images_per_prompt=1", "prompt_draw={count: 3, seed: 5, replace: true}"))
    gens = pd.read_csv(tmp_path / "generations.csv")
    np.random.seed(5)
    assert gens.prompt.tolist() == list(np.random.choice(["a red circle", "a blue square"], 3))
    assert gens.prompt.nunique() < 3 and gens.prompt_idx.tolist() == [0, 1, 2]
    assert gens.file.tolist() == [f"images/{i:05d}_0.png" for i in range(3)]


@pytest.mark.parametrize(("number", "model"), [(1, "ViT-B-16-quickgelu"), (2, "ViT-B-16-quickgelu"), (3, "ViT-g-14"),
                                               (4, "ViT-g-14"), (5, "ViT-g-14")])
def test_each_table_scores_clip_with_its_reference_network(number: int, model: str) -> None:
    from tests.test_configs import compose_config

    cfg = compose_config([f"experiment=table{number}", "paths.weights_dir=/w"])
    assert cfg.metrics.alignment.model == model
    assert cfg.metrics.alignment.path == ("/w/ViT-B-16-openai.bin" if number < 3 else "/w/ViT-g-14.bin")
    plain = compose_config([f"experiment=table{number}", "paths.weights_dir=/w", "++clip_network=null"])
    assert plain.metrics.alignment.model == "ViT-g-14"


@pytest.mark.parametrize(("scenario", "images", "per_prompt"), [
    ("laion10k", 1, None), ("laion100k", 1, None), ("imagenette", 100, None), ("wen_dup200", 4, None),
    ("webster500", 4, "index")])
def test_scenario_defaults_are_the_ones_docs_protocol_lists(scenario: str, images: int, per_prompt: str | None) -> None:
    conf = OmegaConf.load(CONF / "scenario" / f"{scenario}.yaml")
    assert conf.images_per_prompt == images and conf.get("references_per_prompt") == per_prompt
    assert (CONF.parent / "docs" / "protocol.md").read_text().count(f"`images_per_prompt: {images}`") >= 1


def test_baseline_defaults_are_the_ones_docs_protocol_lists() -> None:
    mitigation = lambda name: OmegaConf.load(CONF / "mitigation" / f"{name}.yaml")
    assert mitigation("ren").attention.mask_branches == "both"
    for level in (1, 3):
        assert mitigation(f"wen_l{level}").embedding._target_ == "memguard.baselines.WenSharedEmbedding"
        per_image = mitigation(f"wen_l{level}_per_image")
        assert per_image.embedding._target_ == "memguard.baselines.WenEmbeddingOptimization"
        assert per_image.embedding.lr == 0.05 and per_image.embedding.max_iters == 10
