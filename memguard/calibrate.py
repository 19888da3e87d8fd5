"""``memguard calibrate mitigation=NAME``: a threshold-bearing method's threshold, derived on the model at hand.

The method's YAML declares what is calibrated (:mod:`memguard.mitigations.calibration`): the ``score`` per control
image, the config ``key`` it sets, the false-positive rate ``fpr``. The scores come from the scenario's control
prompts (``calibration.groups``: prompts that are not memorized), in one of two ways:

- ``score: slot:NAME``: the mitigation's slot ``NAME`` scores each control image from the model's first step
  (``calibration_scores``; SAIL: its loss at the image's own noise);
- ``score: detection``: Wen et al.'s detection score of a standard-CFG run of the control prompts (the ordinary run
  folder ``${scenario.name}/none``, made or resumed here), over steps ``0..mitigation.auto.detect_step``: what
  ``mitigation=auto`` compares (``memguard calibrate RUN_DIR`` does the same from a folder already made);
- ``score: call:MODULE.FUNCTION``: ``FUNCTION(cfg, control prompts)`` (NeMo: each sample's largest pairwise MS-SSIM).

The value is, by ``rule``, ``fpr`` (default): :func:`~memguard.mitigations.calibration.threshold_at`, at most
``fpr`` of the control images above it; or ``mean_std``: their mean + 1 std (NeMo's README l. 41). It is written with the model's identity to ``calibration.file``, which every later run of the method applies.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from memguard.components import DTYPES, load_scheduler, resolve_device
from memguard.errors import UserError, instantiate_checked
from memguard.families import load_family
from memguard.guidance import detection_score
from memguard.metrics.detection import d_matrix
from memguard.mitigations import Start
from memguard.mitigations.calibration import model_identity, sampler_record, threshold_at
from memguard.protocol import resolve_sampler
from memguard.runner import build_scheduler, run
from memguard.runs.folder import folder_lock
from memguard.runs.prompts import load_prompts
from memguard.runs.seeds import load_seeds
from memguard.sampling import prepare_batch

log = logging.getLogger(__name__)


def control_pairs(cfg: DictConfig, groups: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompts and the (prompt_idx, seed) pairs of the control groups."""
    loaded, seeds = load_prompts(cfg), load_seeds(cfg)
    keep = [i for i, g in enumerate(loaded.groups) if g is not None and str(g) in groups]
    if not keep:
        found = sorted({str(g) for g in loaded.groups if g is not None})
        raise UserError(f"mitigation.calibration.groups={groups}: no prompt of the scenario is in these groups "
                        f"(its groups: {', '.join(found) or 'none'}); name its non-memorized group")
    return loaded.texts, [(i, s) for i in keep for s in seeds.of(i)]


def slot_scores(cfg: DictConfig, slot: str, groups: list[str]) -> np.ndarray:
    """Each control image's score by the mitigation's slot ``slot`` at the first sampling step."""
    prompts, pairs = control_pairs(cfg, groups)
    scorer = instantiate_checked(cfg.mitigation[slot], f"mitigation.{slot}")
    device = resolve_device(cfg.device)
    family = load_family(cfg.model.path, device, DTYPES[cfg.dtype], cfg.model.get("family"))
    resolve_sampler(cfg, type(family))
    scheduler = build_scheduler(cfg, load_scheduler(cfg.model.path))
    scheduler.set_timesteps(cfg.sampler.steps, device=device)
    a, b = family.eps_coefficients(scheduler)
    start = Start(scheduler, scheduler.timesteps[0], float(getattr(scheduler, "init_noise_sigma", 1.0)), a[0], b[0])
    size = int(cfg.batch_size) if str(cfg.batch_size).isdigit() else 8
    scores = []
    for i in range(0, len(pairs), size):
        batch = pairs[i:i + size]
        cond, uncond, noise = prepare_batch(family, [prompts[p] for p, _ in batch], [s for _, s in batch],
                                            cfg.resolution)
        scores.append(scorer.calibration_scores(family, start, cond, uncond, noise).cpu())
    return torch.cat(scores).numpy()


def detection_scores(cfg: DictConfig, groups: list[str], control_run: str | None = None) -> tuple[np.ndarray, str]:
    """Wen et al.'s score over steps ``0..detect_step`` of the control images of a standard-CFG run (made or
    resumed in its ordinary folder, ``runs/<scenario>/none``, or the run name ``control_run``), and that folder."""
    with open_dict(cfg):
        none = cfg.copy()
    none.mitigation = OmegaConf.create({"name": "none", "schedule": {"_target_": "memguard.guidance.Constant",
                                                                      "scale": float(cfg.guidance.scale)}})
    none.run_name = control_run or f"{cfg.scenario.name}/none"
    none.run_dir = str(Path(cfg.paths.output_dir) / "runs" / none.run_name)
    none.evaluate = False
    run(none)
    generations = pd.read_csv(Path(none.run_dir) / "generations.csv")
    generations = generations[generations.group.astype(str).isin(groups)]
    steps = int(cfg.mitigation.auto.detect_step) + 1
    return detection_score(d_matrix(Path(none.run_dir), generations), steps).numpy(), none.run_dir


def calibrate(cfg: DictConfig, control_run: str | None = None) -> dict[str, Any]:
    """Score the control images, take the threshold by ``rule``, write ``calibration.file``; returns its content.
    ``control_run``: the standard-CFG run name ``score: detection`` reads (default ``<scenario>/none``)."""
    node = cfg.mitigation.get("calibration")
    if node is None:
        raise UserError(f"mitigation={cfg.mitigation.name} has no threshold to calibrate (no calibration node in its "
                        "YAML); calibrate one of: auto, sail")
    negative = OmegaConf.select(cfg, "metrics.detection.negative", default=None)  # the scenario's non-memorized
    groups = [str(g) for g in (node.get("groups") or negative or [cfg.control_group])]
    if cfg.get("dataset") is not None:  # a scenario whose data memguard generates (tiny) writes it first, as run does
        with folder_lock(Path(cfg.paths.output_dir), "dataset"):
            instantiate_checked(cfg.dataset, "dataset")
    started, source = time.perf_counter(), None
    score = str(node.score)
    if score.startswith("slot:"):
        scores = slot_scores(cfg, score.removeprefix("slot:"), groups)
    elif score == "detection":
        scores, source = detection_scores(cfg, groups, control_run)
    elif score.startswith("call:"):  # a function (cfg, control prompts) -> scores
        module, _, function = score.removeprefix("call:").rpartition(".")
        prompts, pairs = control_pairs(cfg, groups)
        scores = getattr(importlib.import_module(module), function)(cfg, [prompts[p] for p, _ in pairs]).numpy()
    else:
        raise UserError(f"mitigation.calibration.score={score!r} must be slot:NAME, detection or call:MODULE.FUNCTION")
    rule = str(node.get("rule", "fpr"))
    if rule not in ("fpr", "mean_std"):
        raise UserError(f"mitigation.calibration.rule={rule!r} must be fpr or mean_std")
    value = threshold_at(scores, float(node.fpr)) if rule == "fpr" else float(scores.mean() + scores.std(ddof=1))
    scaled = {str(k): value * float(f) for k, f in (node.get("scaled") or {}).items()}  # keys tied to the key's value
    result = {"mitigation": str(cfg.mitigation.name).split("_t")[0], "values": {str(node.key): value, **scaled},
              "score": score, "rule": rule, "fpr": node.get("fpr"), "measured_fpr": float((scores > value).mean()),
              "n_images": int(len(scores)), "groups": groups, "control_run": source,
              "score_quantiles": {q: float(np.quantile(scores, q)) for q in (0.05, 0.5, 0.95)},
              "default": OmegaConf.select(cfg, str(node.key)),
              "defaults": {k: OmegaConf.select(cfg, k) for k in (str(node.key), *scaled)},
              "model": model_identity(cfg.model.path), "sampler": sampler_record(cfg),
              "scenario": str(cfg.scenario.name), "seconds": round(time.perf_counter() - started, 3)}
    path = Path(node.file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{node.key} = {value:.6g} (default {result['default']}; rule {rule}): {result['measured_fpr']:.3f} of "
          f"{len(scores)} control images ({', '.join(groups)}) score above it; written to {path}, which every run of "
          f"mitigation={result['mitigation']} on this model applies")
    return result
