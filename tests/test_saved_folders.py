"""Every family's saved folder through the command line, as a user meets it.

For sd, sdxl, sd3 (with and without T5) and dit: a folder written by the family's diffusers pipeline
(``save_pretrained``), one written by ``memguard random-model``, and, for the text families, the pipeline's folder
with ``feature_extractor`` / ``image_encoder`` dropped from ``model_index.json`` (as older hub folders are). Each
goes through ``memguard run scenario=custom model.path=...`` with no sampler named: ``mitigation=none`` must give
the images the family's own diffusers pipeline (``from_pretrained`` on the same folder) gives with the sampler
``sampler=auto`` chose, and ``og_dtp`` must complete on each family.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from memguard.cli import main
from memguard.families import null_entries, random_family
from memguard.families.sd3 import SD3
from tests.test_cli import memguard_here

pytestmark = pytest.mark.slow

PROMPTS, SEEDS, STEPS, SCALE = ["417", "1"], [11, 12], 3, 7.5  # DiT reads the prompts as class ids
FAMILIES = {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3", "sd3_no_t5": "sd3", "dit": "dit"}
OLD_STYLE = ("sd", "sdxl", "sd3")  # families whose pipelines list feature_extractor / image_encoder


def write_folders(root: Path) -> dict[str, str]:
    """tag -> family for every folder written under ``root`` (``root/tag``)."""
    folders = {}
    for kind, family in FAMILIES.items():
        model = SD3.random(t5=False) if kind == "sd3_no_t5" else random_family(family)
        model.pipeline().save_pretrained(root / f"{kind}_pipeline")  # diffusers' own writer, nothing added
        main(["random-model", str(root / f"{kind}_memguard"), "--family", family,  # the command, in-process
              *(["--no-t5"] if kind == "sd3_no_t5" else [])])
        folders |= {f"{kind}_pipeline": family, f"{kind}_memguard": family}
        if kind in OLD_STYLE:
            old = root / f"{kind}_old_index"
            shutil.copytree(root / f"{kind}_pipeline", old)
            index = json.loads((old / "model_index.json").read_text())
            assert {"feature_extractor", "image_encoder"} <= set(index)
            index = {k: v for k, v in index.items() if k not in ("feature_extractor", "image_encoder")}
            (old / "model_index.json").write_text(json.dumps(index, indent=2))
            folders[old.name] = family
    return folders


def pipeline_images(folder: Path, family: str, scales: tuple[float, ...]) -> list[dict[tuple[int, int], np.ndarray]]:
    """Per guidance scale: (prompt_idx, seed) -> the family pipeline's image as memguard writes it (8-bit), the
    pipeline loaded from the folder by diffusers (once) and given the scheduler sampler=auto chooses (flow-matching
    Euler for sd3, the folder's own; DPM-Solver++ from the folder's scheduler config otherwise)."""
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, index["_class_name"])
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    pipe = pipeline_class.from_pretrained(folder, **extra, **null_entries(folder))
    if family != "sd3":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    per_scale = []
    for scale in scales:
        images = {}
        for seed in SEEDS:
            generators = [torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS]
            inputs = [int(p) for p in PROMPTS] if family == "dit" else PROMPTS
            out = pipe(inputs, guidance_scale=scale, num_inference_steps=STEPS, generator=generators,
                       output_type="np").images
            for idx, image in enumerate(out):
                images[(idx, seed)] = (image * 255).round().astype(np.int16)
        per_scale.append(images)
    return per_scale


def test_every_familys_saved_folder_runs_through_the_cli_as_its_pipeline(tmp_path: Path) -> None:
    folders = write_folders(tmp_path / "models")
    common = ["scenario=custom", f"model.path={tmp_path / 'models'}/${{tag}}", "run_name=${tag}/${mitigation.name}",
              f"prompts=[{','.join(repr(p) for p in PROMPTS)}]", f"seeds=[{','.join(map(str, SEEDS))}]",
              f"sampler.steps={STEPS}", "progress=false"]
    # one command sweeps every folder (in this process: tests/test_wheel.py and test_cli.py start processes)
    result = memguard_here("run", "-m", f"+tag={','.join(folders)}", "mitigation=none", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # og_dtp once per family, on the folders `memguard random-model` wrote (the command, in this process): the
    # folder's writer is what the none runs above vary, the family what the mitigation's hooks meet
    result = memguard_here("run", "-m", f"+tag={','.join(f'{kind}_memguard' for kind in FAMILIES)}",
                           "mitigation=og_dtp", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "outputs" / "runs"
    wants: dict[str, dict] = {}
    for tag, family in folders.items():
        config = (runs / tag / "none" / "config.yaml").read_text()
        assert f"name: {'flow' if family == 'sd3' else 'dpm'}\n" in config, tag  # sampler=auto, written down
        pipeline_tag = tag.removesuffix("_old_index") + "_pipeline"  # an old index: that folder's files, copied
        # and on a pipeline folder (once per family), at half the scale too: the comparison can fail
        scales = (SCALE, SCALE / 2) if tag.endswith("_pipeline") else (SCALE,)
        if pipeline_tag in wants:
            want, other = wants[pipeline_tag], []
        else:
            want, *other = pipeline_images(tmp_path / "models" / tag, family, scales)
        wants[tag] = want
        for (idx, seed), expected in want.items():
            ours = np.asarray(Image.open(runs / tag / "none" / "images" / f"{idx:05d}_{seed}.png").convert("RGB"),
                              dtype=np.int16)
            # floats agree to ~1e-5 (tests/test_families.py), so 8-bit rounding differs by at most one level
            assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1, (tag, idx, seed)
        if other:
            assert max(np.abs(other[0][k] - want[k]).max() for k in want) > 1, tag
    for kind in FAMILIES:
        metrics = json.loads((runs / f"{kind}_memguard" / "og_dtp" / "metrics.json").read_text())
        assert metrics["mitigation"] == "og_dtp" and metrics["n_images"] == len(PROMPTS) * len(SEEDS), kind


def test_an_sd3_folder_without_t5_runs_with_no_sampler_named(tmp_path: Path) -> None:
    main(["random-model", str(tmp_path / "sd3"), "--family", "sd3", "--no-t5"])
    result = memguard_here("run", "scenario=custom", f"model.path={tmp_path / 'sd3'}", "prompts=[a cat]",
                           "images_per_prompt=1", "sampler.steps=2", cwd=tmp_path)  # the command, in this process
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Hydra logs to stdout
    assert "sampler=auto: flow (FlowMatchEulerDiscreteScheduler, 2 steps)" in log
    assert log.count("text_encoder_3 null") == 1  # the zeros for T5 are said once
    assert len(list((tmp_path / "outputs" / "runs" / "custom" / "none" / "images").glob("*.png"))) == 1
