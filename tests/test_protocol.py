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


def test_newer_mitigations_defaults_are_the_ones_docs_protocol_lists() -> None:
    mitigation = lambda name: OmegaConf.load(CONF / "mitigation" / f"{name}.yaml")
    han, per_sample = mitigation("han"), mitigation("han_per_sample")
    assert (han.noise.iterations, han.noise.rho, han.noise.gamma, han.schedule.step) == (2, 50, 0.7, 4)
    assert (per_sample.noise.lr, per_sample.noise.iterations, per_sample.noise.target) == (0.01, 1000, 0.9)
    sail = mitigation("sail").noise
    assert (sail.threshold, sail.budget, sail.lr, sail.max_steps, sail.pool, sail.direction) == (8.2, 8, 0.05, 10,
                                                                                              "image", "first")
    prss = mitigation("prss")
    assert (prss.branches.target, prss.branches.threshold, prss.branches.gate, prss.embedding.l_target) == (3, 5,
                                                                                                 "sample", 1)
    assert mitigation("nemo").attention.factor == 0.0
    guard = mitigation("guard")
    assert (guard.branches.repulsion, guard.branches.decay, guard.attention.scale, guard.attention.threshold,
            guard.attention.blocks) == (2.0, "cosine", 0.3, 0.1, "early")
    assert (mitigation("guard_ca").attention.threshold, mitigation("guard_ca").attention.blocks) == (0.01, "early")
    rows = (CONF.parent / "docs" / "protocol.md").read_text()
    for text in ("`mitigation.noise.iterations: 2`, `rho: 50`, `gamma: 0.7`", "`DelayedStart(step: 4)`",
                 "`lr: 0.01`, `iterations: 1000`, `target: 0.9`", "`pool: image`", "`direction: first`",
                 "`mitigation.branches.target: 3`, `threshold: 5`", "`gate: sample`", "`factor: 0.0`",
                 "`repulsion: 2`, `scale: 0.3`, `threshold: 0.1` / `0.01`, `blocks: early`"):
        assert text in rows, text


def test_baseline_defaults_are_the_ones_docs_protocol_lists() -> None:
    mitigation = lambda name: OmegaConf.load(CONF / "mitigation" / f"{name}.yaml")
    assert mitigation("ren").attention.mask_branches == "both"
    for level in (1, 3):
        assert mitigation(f"wen_l{level}").embedding._target_ == "memguard.mitigations.wen.WenSharedEmbedding"
        per_image = mitigation(f"wen_l{level}_per_image")
        assert per_image.embedding._target_ == "memguard.mitigations.wen.WenEmbeddingOptimization"
        assert per_image.embedding.lr == 0.05 and per_image.embedding.max_iters == 10


# mitigation.prompt.per: random tokens drawn per image, or once per prompt as Wen et al.'s code

def test_random_tokens_per_prompt_give_all_a_prompts_images_one_augmented_prompt(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path / "prompt", "mitigation=rand_word", "random_tokens_per=prompt",
               "images_per_prompt=3", "sampler.steps=2"))
    per_prompt = pd.read_csv(tmp_path / "prompt" / "generations.csv")
    assert (per_prompt.groupby("prompt_idx").model_prompt.nunique() == 1).all()
    assert (per_prompt.model_prompt != per_prompt.prompt).all()
    run(config(tiny_model_dir, tmp_path / "image", "mitigation=rand_word", "images_per_prompt=3", "sampler.steps=2"))
    per_image = pd.read_csv(tmp_path / "image" / "generations.csv")
    assert (per_image.groupby("prompt_idx").model_prompt.nunique() == 3).all()  # the default: a draw per image
    with pytest.raises(UserError, match=r"mitigation.prompt.*per='seed' must be image"):
        run(config(tiny_model_dir, tmp_path / "bad", "mitigation=rand_word", "mitigation.prompt.per=seed"))


def test_each_scenario_draws_random_tokens_as_the_code_behind_its_table() -> None:
    from tests.test_configs import compose_config

    for scenario, per in (("wen_dup200", "prompt"), ("webster500", "prompt"), ("laion10k", "image"), ("tiny", "image")):
        assert compose_config([f"scenario={scenario}", "mitigation=rand_numb"]).mitigation.prompt.per == per, scenario


def test_a_rand_word_folder_written_before_per_existed_resumes_as_per_image(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "mitigation=rand_word", "sampler.steps=2"))
    saved = tmp_path / "config.yaml"
    old = [line for line in saved.read_text().splitlines() if line.strip() not in ("per: image", "random_tokens_per: image")]
    saved.write_text("\n".join(old) + "\n")
    assert "per: image" not in saved.read_text()
    run(config(tiny_model_dir, tmp_path, "mitigation=rand_word", "sampler.steps=2"))  # resumes: nothing differs
    with pytest.raises(UserError, match=r"mitigation.prompt.per: 'image' -> 'prompt'"):
        run(config(tiny_model_dir, tmp_path, "mitigation=rand_word", "sampler.steps=2", "random_tokens_per=prompt"))


# +protocol=authors: each baseline under its authors' sampler and dtype

def test_protocol_authors_runs_a_baseline_under_its_authors_sampler_and_dtype(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    from tests.test_configs import compose_config

    cfg = compose_config(["+protocol=authors", "mitigation=wen_l1", "scenario=wen_dup200"])
    assert cfg.run_name == "wen_dup200/wen_l1@authors" and cfg.protocol.mitigations.ren.dtype == "float16"
    run(config(tiny_model_dir, tmp_path / "wen", "+protocol=authors", "mitigation=wen_l1_per_image",
               "mitigation.embedding.max_iters=1", "sampler.steps=3"))
    saved = OmegaConf.load(tmp_path / "wen" / "config.yaml")
    assert saved.sampler.name == "ddim" and saved.dtype == "bfloat16" and saved.sampler.steps == 3
    from memguard.tables import run_protocol

    assert "ddim 3 steps, scale 7.5, bfloat16 (protocol authors)" in run_protocol(tmp_path / "wen")
    run(config(tiny_model_dir, tmp_path / "dtp", "+protocol=authors", "mitigation=dtp", "sampler.steps=3"))
    kept = OmegaConf.load(tmp_path / "dtp" / "config.yaml")  # not a baseline: the paper's protocol
    assert kept.sampler.name == "dpm" and kept.dtype == "float32"


def test_protocol_authors_gives_ren_euler_on_a_v_prediction_model() -> None:
    from omegaconf import open_dict

    from memguard.protocol import apply_protocol
    from tests.test_configs import compose_config

    for v, sampler in ((False, "ddim"), (True, "euler")):
        cfg = compose_config(["+protocol=authors", "mitigation=ren", "sampler=dpm"])
        apply_protocol(cfg, v_prediction=v)
        assert (cfg.sampler.name, cfg.dtype, cfg.sampler.steps) == (sampler, "float16", 50)
    cfg = compose_config(["+protocol=authors", "mitigation=ren", "sampler=dpm"])
    with open_dict(cfg):
        cfg.protocol.mitigations.ren.sampler = "heun"
    with pytest.raises(UserError, match=r"protocol.mitigations.ren.sampler=heun is not a sampler"):
        apply_protocol(cfg, v_prediction=False)
