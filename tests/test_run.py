"""run(cfg): the run folder, resuming, refusing to mix settings, and batch-size independence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from memguard.errors import UserError
from memguard.guidance import dtp_switch_step
from memguard.runner import run
from memguard.runs.folder import read_record
from tests.numerics import assert_away_from_dtp_ties
from tests.test_configs import compose_config

PROMPTS = "[a red circle,a blue square]"


def config(model: Path, run_dir: Path, *extra: str):
    return compose_config([
        "scenario=custom", f"model.path={model}", f"prompts={PROMPTS}", "images_per_prompt=2",
        "sampler.steps=6", f"run_dir={run_dir}", "progress=false", *extra,
    ])


def test_run_writes_the_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    metrics = run(config(tiny_model_dir, tmp_path, "mitigation=og_dtp"))
    images = sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    assert images == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    for name in ("config.yaml", "trajectories.csv", "generations.csv", "metrics.json", "grid.png", "d_curves.png",
                 "norms.png", "report.html"):
        assert (tmp_path / name).is_file(), name

    traj = pd.read_csv(tmp_path / "trajectories.csv")
    assert list(traj.columns) == ["prompt_idx", "seed", "step", "timestep", "d", "scale", "norm_c", "norm_u"]
    assert len(traj) == 4 * 6 and traj.step.max() == 5 and (traj.d > 0).all()
    # ||eps_c - eps_u|| <= ||eps_c|| + ||eps_u||, and the norms are the model's, not the difference
    assert (traj.d ** 0.5 <= traj.norm_c + traj.norm_u + 1e-4).all() and (traj.norm_c > 0).all()
    gens = pd.read_csv(tmp_path / "generations.csv")
    assert list(gens.columns) == ["prompt_idx", "prompt", "group", "reference_key", "seed", "file", "model_prompt",
                                  "transition_step", "transition_timestep"]
    assert gens.prompt.tolist() == ["a red circle"] * 2 + ["a blue square"] * 2
    for row in gens.itertuples():  # the transition recorded is Algorithm 1's, from the recorded d
        d = traj[(traj.prompt_idx == row.prompt_idx) & (traj.seed == row.seed)].d.tolist()
        expected = dtp_switch_step(d)
        assert (None if pd.isna(row.transition_step) else int(row.transition_step)) == expected
        scales = traj[(traj.prompt_idx == row.prompt_idx) & (traj.seed == row.seed)].scale.tolist()
        assert scales == [-7.5] * (expected if expected is not None else 6) + [7.5] * (6 - (expected or 6))

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics and saved["n_images"] == 4 and saved["mitigation"] == "og_dtp"
    fired = gens.transition_step.notna().mean()
    assert saved["transition"]["fired_fraction"] == pytest.approx(fired)


def test_rerun_resumes_and_keeps_finished_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path))
    kept = tmp_path / "images" / "00000_0.png"
    before = kept.stat().st_mtime_ns
    (tmp_path / "images" / "00001_1.png").unlink()
    metrics = run(config(tiny_model_dir, tmp_path, "images_per_prompt=3"))
    assert metrics["generation"]["images_made"] == 3  # the deleted one and the new seed of each prompt
    assert kept.stat().st_mtime_ns == before
    assert len(pd.read_csv(tmp_path / "generations.csv")) == 6
    assert run(config(tiny_model_dir, tmp_path, "images_per_prompt=3"))["generation"]["images_made"] == 0


def test_other_settings_are_refused_not_mixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path))
    with pytest.raises(UserError, match=r"other settings \(.*guidance.scale: 7.5 -> 3"):
        run(config(tiny_model_dir, tmp_path, "guidance.scale=3"))
    with pytest.raises(UserError, match="the prompt list changed"):
        run(config(tiny_model_dir, tmp_path, "prompts=[a green triangle]"))


def test_images_do_not_depend_on_batch_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path / "b1", "batch_size=1", "mitigation=dtp"))
    run(config(tiny_model_dir, tmp_path / "b4", "batch_size=4", "mitigation=dtp"))
    assert_away_from_dtp_ties([read_record(p).d for p in (tmp_path / "b4" / "images").glob("*.png")])
    for path in (tmp_path / "b1" / "images").glob("*.png"):
        one, four = (np.asarray(Image.open(tmp_path / b / "images" / path.name), dtype=int) for b in ("b1", "b4"))
        assert np.abs(one - four).max() <= 1  # identical up to uint8 rounding of float noise
        np.testing.assert_allclose(read_record(path).d, read_record(tmp_path / "b4" / "images" / path.name).d, rtol=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    (["prompts=[]"], "no prompts"),
    (["prompts_file=/no/such/file.txt", "prompts=null"], "prompts_file='/no/such/file.txt' is not a file"),
    (["guidance.scale=-1"], "guidance.scale=-1 must be a number >= 0"),
    (["mitigation=stp", "mitigation.schedule.tau=1000"], r"mitigation.schedule.tau=1000.0 is outside .*\[0, 999\]"),
    (["mitigation=interval", "mitigation.schedule.t_lo=800"], "t_lo=800 is greater than t_hi=700"),
    (["seeds=[1,1]"], "seeds=.* distinct"),
    (["dtype=float64"], "dtype='float64' is not one of"),
])
def test_bad_inputs_name_the_key(tiny_model_dir: Path, tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        run(config(tiny_model_dir, tmp_path, *overrides))
    assert not (tmp_path / "config.yaml").exists()  # nothing written for a rejected run


def test_missing_model_folder_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model.path='.*nothing' is not a folder; .*unet/"):
        run(config(tmp_path / "nothing", tmp_path / "run"))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(UserError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        run(config(tmp_path / "partial", tmp_path / "run"))


def test_prompts_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    run(config(tiny_model_dir, tmp_path / "run", "prompts=null", f"prompts_file={prompts}", "images_per_prompt=1"))
    assert pd.read_csv(tmp_path / "run" / "generations.csv").prompt.tolist() == ["a cat", "a dog"]


# ---------------------------------------------------------------------------------------------------------------
# seed_scheme


def _pixels(run_dir: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(run_dir / "images" / name), dtype=int)


def test_seed_scheme_per_prompt_gives_each_prompt_its_own_noise(tiny_model_dir: Path, tmp_path: Path) -> None:
    same = "prompts=[a red circle,a red circle,a blue square]"
    run(config(tiny_model_dir, tmp_path / "shared", same, "sampler.steps=3"))
    run(config(tiny_model_dir, tmp_path / "b1", same, "sampler.steps=3", "seed_scheme=per_prompt", "batch_size=1"))
    run(config(tiny_model_dir, tmp_path / "b8", same, "sampler.steps=3", "seed_scheme=per_prompt", "batch_size=8"))
    assert np.array_equal(_pixels(tmp_path / "shared", "00000_0.png"), _pixels(tmp_path / "shared", "00001_0.png"))
    gens = pd.read_csv(tmp_path / "b1" / "generations.csv")
    assert gens.seed.tolist() == [0, 1, 1_000_000, 1_000_001, 2_000_000, 2_000_001]  # i * 1000000 + s
    assert gens.file.tolist() == [f"images/{i:05d}_{s}.png" for i, s in zip(gens.prompt_idx, gens.seed)]
    assert [read_record(tmp_path / "b1" / f).seed for f in gens.file] == gens.seed.tolist()
    # the same prompt twice: other noise, so other images; prompt 0 keeps the shared scheme's seeds
    assert np.abs(_pixels(tmp_path / "b1", "00000_0.png") - _pixels(tmp_path / "b1", "00001_1000000.png")).max() > 10
    assert np.array_equal(_pixels(tmp_path / "b1", "00000_1.png"), _pixels(tmp_path / "shared", "00000_1.png"))
    for name in gens.file:  # per-image seeds: the batch size changes nothing
        assert np.abs(_pixels(tmp_path / "b1", name[7:]) - _pixels(tmp_path / "b8", name[7:])).max() <= 1
    assert "seed_scheme: per_prompt" in (tmp_path / "b1" / "config.yaml").read_text()
    assert (tmp_path / "b1" / "grid.png").is_file()


def test_seed_scheme_per_prompt_resumes_shards_and_is_never_mixed(tiny_model_dir: Path, tmp_path: Path) -> None:
    per_prompt = ["seed_scheme=per_prompt", "sampler.steps=3"]
    for index in (0, 1):  # two shards fill the folder; the second finishes it
        result = run(config(tiny_model_dir, tmp_path, *per_prompt, f"shard.index={index}", "shard.count=2"))
    assert result["n_images"] == 4
    kept = tmp_path / "images" / "00001_1000000.png"
    before = kept.stat().st_mtime_ns
    (tmp_path / "images" / "00001_1000001.png").unlink()
    metrics = run(config(tiny_model_dir, tmp_path, *per_prompt, "images_per_prompt=3"))
    assert metrics["generation"]["images_made"] == 3  # the deleted one and seed s=2 of each prompt
    assert kept.stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == [
        "00000_0.png", "00000_1.png", "00000_2.png", "00001_1000000.png", "00001_1000001.png", "00001_1000002.png"]
    with pytest.raises(UserError, match=r"other settings \(seed_scheme: 'per_prompt' -> 'shared'\)"):
        run(config(tiny_model_dir, tmp_path, "sampler.steps=3", "images_per_prompt=3"))


def test_folders_from_before_seed_scheme_resume_as_shared(tiny_model_dir: Path, tmp_path: Path) -> None:
    run(config(tiny_model_dir, tmp_path, "sampler.steps=3"))
    saved = tmp_path / "config.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.startswith("seed_scheme:")))
    assert run(config(tiny_model_dir, tmp_path, "sampler.steps=3"))["generation"]["images_made"] == 0
    with pytest.raises(UserError, match=r"seed_scheme: 'shared' -> 'per_prompt'"):
        run(config(tiny_model_dir, tmp_path, "sampler.steps=3", "seed_scheme=per_prompt"))


def test_seeds_of_each_scheme() -> None:
    from memguard.runs.seeds import load_seeds

    shared = load_seeds(compose_config(["images_per_prompt=3"]))
    assert len(shared) == 3 and shared.of(0) == shared.of(7) == [0, 1, 2] and shared.image_set(2) == [0, 1, 2]
    per_prompt = load_seeds(compose_config(["seeds=[5,9]", "seed_scheme=per_prompt"]))
    assert per_prompt.pairs(2) == [(0, 5), (0, 9), (1, 1_000_005), (1, 1_000_009)]
    assert per_prompt.image_set(1_000_009) == [1_000_005, 1_000_009]  # Wen's image set: the prompt's own seeds
    four = load_seeds(compose_config(["seed_scheme=per_prompt", "images_per_prompt=4"]))
    seeds = [s for i in range(500) for s in four.of(i)]
    assert len(set(seeds)) == len(seeds) == 2000
    with pytest.raises(UserError, match="seed_scheme='random' is not one of shared"):
        load_seeds(compose_config(["seed_scheme=random"]))
    with pytest.raises(UserError, match="must be below 1000000 with seed_scheme=per_prompt"):
        load_seeds(compose_config(["seeds=[1000000]", "seed_scheme=per_prompt"]))


def test_wen_shared_embedding_under_per_prompt_seeds(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Each prompt's embedding is optimised over its own images' noises, whatever the batch."""
    wen = ["mitigation=wen_l1", "seed_scheme=per_prompt", "sampler.steps=3", "mitigation.embedding.max_iters=2",
           "mitigation.embedding.l_target=1e-6"]
    run(config(tiny_model_dir, tmp_path / "b1", *wen, "batch_size=1"))
    run(config(tiny_model_dir, tmp_path / "b8", *wen, "batch_size=8"))
    one, eight = (pd.read_csv(tmp_path / b / "generations.csv") for b in ("b1", "b8"))
    assert one.groupby("prompt_idx").wen_first_norm.nunique().eq(1).all()  # one set per prompt
    assert one.wen_first_norm.to_numpy() == pytest.approx(eight.wen_first_norm.to_numpy(), rel=1e-5)
    for name in one.file:
        assert np.abs(_pixels(tmp_path / "b1", name[7:]) - _pixels(tmp_path / "b8", name[7:])).max() <= 1
