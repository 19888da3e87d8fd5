"""A threshold-bearing method's calibration on the model at hand: declared in its YAML, applied to every run.

``conf/mitigation/NAME.yaml`` declares (``mitigation.calibration``)::

    calibration:
      score: {_target_: memguard.mitigations.sail.first_loss, ...}   # per control image: the quantity the threshold cuts
      key: mitigation.noise.threshold     # the config key the calibrated value replaces
      fpr: 0.05                           # at most this fraction of control images score above the value
      scaled: {}                          # other keys set to the value times a factor (PRSS: threshold = 5/3 target)
      file: ${paths.output_dir}/calibration/${scenario.name}/sail.json
      tuned_on: {prediction_type: epsilon, sample_size: 64, cross_attention_dim: 768}   # the default's model (SD 1.4)

``memguard calibrate mitigation=NAME`` (:mod:`memguard.calibrate`) scores the scenario's control (non-memorized)
images, takes :func:`threshold_at` and writes ``file`` with the model's :func:`model_identity`. A run then
(:func:`apply_calibration`) replaces ``key`` with the value, after checking the identity, and copies the file into
its folder (``calibration.json``, with the keys it ``applied``: a value given on the command line, such as a
sweep's point, is kept); without a file, a model unlike ``tuned_on`` gets one warning naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.metrics.detection import sampler_record, threshold_at  # noqa: F401  (threshold_at: the one rule, re-exported for the task)

log = logging.getLogger(__name__)


def model_identity(model_path: str | Path) -> dict[str, Any]:
    """What identifies a model folder cheaply: the SHA-256 of its config files' contents and of every file's
    relative path and size (weights are not read: gigabytes), and the denoiser's geometry."""
    root = Path(model_path)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}:{path.stat().st_size}\n".encode())
        if path.suffix == ".json" and path.stat().st_size < 1_000_000:
            digest.update(path.read_bytes())
    return {"path": str(root), "sha256": digest.hexdigest(), **model_geometry(root)}


def model_geometry(root: Path) -> dict[str, Any]:
    """The denoiser's prediction type, sample size and cross-attention width (what ``tuned_on`` compares)."""
    out: dict[str, Any] = {}
    for sub, keys in (("scheduler/scheduler_config.json", ("prediction_type",)),
                      ("unet/config.json", ("sample_size", "cross_attention_dim"))):
        if (root / sub).is_file():
            config = json.loads((root / sub).read_text())
            out.update({k: config.get(k) for k in keys})
    return out


def check_sampler(calibration: dict[str, Any], cfg: DictConfig, path: str | Path) -> None:
    """Refuse a run whose sampler differs from the one ``calibration`` (at ``path``) was scored with; ``auto``
    (not yet resolved to a sampler) matches any name."""
    made, here = calibration.get("sampler"), sampler_record(cfg)
    if made is None:  # a file written before calibrations recorded their sampler
        return
    names = {made["name"], here["name"]} - {"auto"}
    if made["steps"] != here["steps"] or len(names) > 1:
        raise UserError(f"calibration {path} was scored with sampler={made['name']} sampler.steps={made['steps']}, "
                        f"this run samples with sampler={here['name']} sampler.steps={here['steps']}: its threshold "
                        f"is a value at other timesteps; sample as it did, or calibrate again with these settings: "
                        f"memguard calibrate mitigation={calibration.get('mitigation')} sampler.steps={here['steps']}")


def check_run_calibration(cfg: DictConfig) -> None:
    """``auto``'s other calibration, the one ``memguard calibrate RUN_DIR`` writes into a run folder (or a shipped
    model's, ``scenario.calibration``), read where no threshold is given: refused if scored with another sampler."""
    auto = cfg.mitigation.get("auto")
    path = auto.get("calibration") if auto is not None and auto.get("threshold") is None else None
    if path and Path(path).is_file():
        check_sampler({"mitigation": "auto", **json.loads(Path(path).read_text())}, cfg, path)


def read_calibration(path: str | Path, model_path: str | Path) -> dict[str, Any]:
    """The calibration file at ``path``, refused if it was made for another model."""
    calibration = json.loads(Path(path).read_text())
    made_for, here = calibration.get("model", {}).get("sha256"), model_identity(model_path)["sha256"]
    if made_for != here:
        raise UserError(f"calibration {path} was made for the model at {calibration.get('model', {}).get('path')} "
                        f"(identity {str(made_for)[:12]}), not model.path={model_path} ({here[:12]}); calibrate again: "
                        f"memguard calibrate mitigation={calibration.get('mitigation')} model.path={model_path}")
    return calibration


def apply_calibration(cfg: DictConfig) -> dict[str, Any] | None:
    """Replace the method's calibrated key with its calibration file's value; without a file, warn once if the
    model differs from the default's ``tuned_on``. Returns the calibration applied (the run records it in its
    folder), or None."""
    node = cfg.mitigation.get("calibration")
    if node is None:
        return None
    method, path = str(cfg.mitigation.name), node.get("file")
    if path and Path(path).is_file():
        calibration = read_calibration(path, cfg.model.path)
        check_sampler(calibration, cfg, path)
        defaults, applied = calibration.get("defaults", {}), {}
        for key, value in calibration["values"].items():  # the calibrated key and those scaled with it
            current = OmegaConf.select(cfg, key)
            if key in defaults and current != defaults[key]:  # set on the command line (a sweep's point): kept
                continue
            OmegaConf.update(cfg, key, value)
            applied[key] = value
        return {**calibration, "applied": applied}
    check_run_calibration(cfg)
    tuned_on = node.get("tuned_on")
    tuned_on = OmegaConf.to_container(tuned_on, resolve=True) if OmegaConf.is_config(tuned_on) else dict(tuned_on or {})
    geometry = model_geometry(Path(cfg.model.path))
    unlike = {k: (v, geometry.get(k)) for k, v in tuned_on.items() if geometry.get(k) != v}
    if unlike:  # a run applies its calibration once: one warning per run
        log.warning("mitigation=%s runs %s=%s uncalibrated: that default was tuned on another model (%s); calibrate "
                    "it on this one: memguard calibrate mitigation=%s (same scenario and model)", method, node.key,
                    OmegaConf.select(cfg, str(node.key)),
                    ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in unlike.items()), method.split("_t")[0])
    return None
