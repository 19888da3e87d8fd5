"""Training the tiny scenario's model: a pixel-space folder that loads like SD, and `memguard train` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from memguard.components import load_components, save_components
from memguard.errors import UserError
from memguard.guidance import Constant
from memguard.procedural import build_rows
from memguard.sampling import generate_images
from memguard.train import TrainSettings, _captioned, _resumable_data, tiny_components, train_denoiser
from tests.test_cli import memguard_here as memguard


def test_pixel_space_model_saves_and_loads_like_stable_diffusion(tmp_path: Path) -> None:
    components = tiny_components(seed=1, width=32)
    folder = save_components(components, tmp_path / "tiny")
    assert not (folder / "vae").exists()
    loaded = load_components(folder)
    assert loaded.vae is None and loaded.vae_scale_factor == 1 and loaded.default_resolution == 16
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    images, traj = generate_images(loaded, loaded.scheduler, Constant(7.5), ["a red circle on a grey background"] * 2,
                                   [0, 1], steps=3)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1 and traj.d.shape == (2, 3)


def test_training_lowers_the_denoising_loss() -> None:
    components = tiny_components(seed=0, width=32)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    losses = train_denoiser(components, images, ["a red circle"] * 8, [1] * 8,
                            TrainSettings(steps=40, batch_size=8, warmup=5, lr=2e-3), progress=False)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    assert not components.unet.training and not any(p.requires_grad for p in components.unet.parameters())


def test_interrupted_training_resumes_bitwise(tmp_path: Path) -> None:
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions, weights = [f"a red circle {i}" for i in range(8)], [1, 1, 1, 1, 2, 2, 1, 1]
    settings = TrainSettings(steps=12, batch_size=4, warmup=3, caption_noise=0.3)
    whole = tiny_components(seed=0, width=32)
    expected = train_denoiser(whole, images, captions, weights, settings, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    stopped = train_denoiser(tiny_components(seed=0, width=32), images, captions, weights, settings, progress=False,
                             checkpoint=checkpoint, checkpoint_every=5, stop_after=7)
    assert stopped == [] and checkpoint.is_file()
    with pytest.raises(UserError, match="lr"):
        train_denoiser(tiny_components(seed=0, width=32), images, captions, weights,
                       TrainSettings(steps=12, batch_size=4, warmup=3, caption_noise=0.3, lr=1e-4),
                       progress=False, checkpoint=checkpoint)
    resumed = tiny_components(seed=1, width=32)  # its own weights are replaced by the checkpoint's
    assert train_denoiser(resumed, images, captions, weights, settings, progress=False,
                          checkpoint=checkpoint) == expected
    assert not checkpoint.exists()
    for name, tensor in whole.unet.state_dict().items():
        assert torch.equal(tensor, resumed.unet.state_dict()[name]), name


def test_an_interrupted_run_keeps_its_dataset_and_refuses_another_recipe(tmp_path: Path) -> None:
    data = {"seed": 0, "size": 16, "n_unique": 4, "n_trigger": 1, "n_shared": 0, "repeats": 2}
    folder = _resumable_data(tmp_path, data, {"width": 32}, None)
    stamp = (folder / "metadata.jsonl").stat().st_mtime_ns
    assert _resumable_data(tmp_path, data, {"width": 32}, None) == folder  # resuming: not written again
    assert (folder / "metadata.jsonl").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="another recipe"):
        _resumable_data(tmp_path, data | {"n_unique": 5}, {"width": 32}, None)


def test_caption_noise_swaps_captions_only_when_asked() -> None:
    idx = torch.arange(4000) % 4
    weights = torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64)  # image 2 never drawn
    generator = torch.Generator().manual_seed(0)
    assert _captioned(idx, weights, TrainSettings(caption_noise=0.0), generator) is idx
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # nothing drawn
    noisy = _captioned(idx, weights, TrainSettings(caption_noise=0.5), generator)
    swapped = noisy != idx
    assert 0.3 < swapped.float().mean() < 0.45  # half drawn again, a quarter of those landing on their own
    assert not (noisy[swapped] == 2).any()       # other captions come from the weighted training draw
    assert (noisy[swapped] == 3).float().mean() > 0.4


def test_dataset_caption_noise_relabels_only_unique_images() -> None:
    clean, samples = build_rows(3, 16, 400, 2, 2, 5)
    noisy, same = build_rows(3, 16, 400, 2, 2, 5, caption_noise=0.5)
    assert same == samples and [r.file_name for r in noisy] == [r.file_name for r in clean]
    changed = [a.kind for a, b in zip(clean, noisy) if a.text != b.text]
    assert set(changed) == {"unique"} and 0.4 < len(changed) / 400 < 0.6
    assert all((a.shape, a.colour, a.background) == (b.shape, b.colour, b.background) for a, b in zip(clean, noisy))


SMALL_RECIPE = ["dataset.n_unique=24", "dataset.n_trigger=1", "dataset.n_shared=1", "dataset.repeats=3",
                "dataset.n_eval_unique=2", "train.settings.steps=2", "train.settings.batch_size=4",
                "train.settings.warmup=1", "train.alignment.n_train=256", "train.alignment.n_test=64",
                "train.alignment.epochs=1"]


@pytest.mark.slow
def test_train_then_run_and_evaluate_the_trained_folder(tmp_path: Path) -> None:
    out = tmp_path / "train"
    result = memguard("train", "scenario=tiny", f"train.output_dir={out}", *SMALL_RECIPE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "model" / "memguard_train.json").read_text())
    assert record["settings"]["steps"] == 2 and record["weights_dtype"] == "float16"
    assert 0 < record["copy_threshold"]["value"] < 1 and record["copy_threshold"]["embedder"] == "pixel(size=16,pool=1,per_channel)"
    assert set(record["alignment_held_out_accuracy"]) == {"shape", "colour", "background"}
    assert (out / "model" / "alignment.pt").is_file()

    run_dir = tmp_path / "run"
    result = memguard("run", "scenario=tiny", f"model.path={out / 'model'}", f"dataset.folder={out / 'data'}",
                      f"dataset.digest={record['dataset_digest']}", *SMALL_RECIPE[:5], "images_per_prompt=2",
                      "sampler.steps=3", "metrics.copy_threshold=0.9", f"run_dir={run_dir}",
                      f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["similarity"]["embedder"] == "pixel(size=16,pool=1,per_channel)" and metrics["similarity"]["references"] == 26
    assert set(metrics["similarity"]["groups"]) == {"trigger", "shared", "unique"}
    assert metrics["alignment"]["scorer"].startswith("attributes[alignment.pt")
    assert metrics["fid"]["kind"] == "fid_attributes"
    gens = pd.read_csv(run_dir / "generations.csv")
    assert {"similarity", "nearest_reference", "alignment", "group"} <= set(gens.columns) and len(gens) == 8

    result = memguard("train", "scenario=tiny", f"train.output_dir={out}", *SMALL_RECIPE, cwd=tmp_path)
    assert result.returncode == 2 and "exists; choose another output folder" in result.stderr  # nothing overwritten


TWO_STAGE_SMALL = ["dataset.n_unique=24", "dataset.n_eval_unique=2", "train.settings.steps=2",
                   "train.settings.batch_size=4", "train.settings.warmup=1", "train.alignment.n_train=256",
                   "train.alignment.n_test=64", "train.alignment.epochs=1", "progress=false"]


def test_two_stage_recipe_pretrains_then_finetunes_reproducibly(tmp_path: Path) -> None:
    """`memguard train scenario=tiny_ft train=pretrain`, then `train=finetune` starting from its weights: the
    fine-tuned record keeps the first stage's recipe and data digest, and a second fine-tuning is bitwise equal."""
    out = [f"paths.output_dir={tmp_path / 'outputs'}"]
    early = memguard("train", "scenario=tiny_ft", "train=finetune", *out, *TWO_STAGE_SMALL, cwd=tmp_path)
    assert early.returncode == 2 and "train.init_from=" in early.stderr and "train=pretrain" in early.stderr
    pre = memguard("train", "scenario=tiny_ft", "train=pretrain", *out, *TWO_STAGE_SMALL, cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr
    pre_folder = tmp_path / "outputs" / "train" / "tiny_pretrain" / "model"
    pre_record = json.loads((pre_folder / "memguard_train.json").read_text())
    assert pre_record["weights_dtype"] == "float32" and pre_record["data"]["n_trigger"] == 0

    tuned = []
    for name in ("a", "b"):
        result = memguard("train", "scenario=tiny_ft", "train=finetune", *out, *TWO_STAGE_SMALL,
                          "dataset.n_trigger=1", "dataset.n_shared=1", "dataset.repeats=3",
                          f"train.output_dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        tuned.append(tmp_path / name / "model")
    record = json.loads((tuned[0] / "memguard_train.json").read_text())
    assert record["init"]["record"]["dataset_digest"] == pre_record["dataset_digest"] != record["dataset_digest"]
    assert record["init"]["record"]["settings"] == pre_record["settings"] and record["settings"]["seed"] == 1
    assert record["model"] == pre_record["model"] and record["weights_dtype"] == "float16"
    first, second, start = (load_components(f).unet.state_dict() for f in (*tuned, pre_folder))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], start[k].half().float()) for k in first)  # fine-tuning moved the weights
