"""Memorization detection from the recorded trajectory: no image, no extra model evaluation.

Per image, from ``d_t = ||eps_c - eps_u||_2^2`` (``trajectories.csv``):

- ``detection_first``: Wen et al.'s score at the first step, ``sqrt(d_0)``;
- ``detection_mean``: the same norm averaged over the first ``steps`` steps (Wen et al. average steps
  ``start:end`` and a prompt's generations: YuxinWenRick/diffusion_memorization, examples/det_mem_viz.ipynb,
  aggregation cell; the norm itself is local_sd_pipeline.py lines 173 and 195);
- ``d_peak_step`` and ``d_fall``: the shape of ``d_t`` the paper describes for memorized prompts under zero
  guidance (high, then falling once the sample leaves the attraction basin): the step of the maximum and the
  fraction ``1 - d_last / d_max`` it has fallen from there by the last step.

With labels (memorized or not) each score gets a ROC curve, its area and the true-positive rate at 1%
false positives, computed as Wen et al.'s notebook does (``tpr`` at the last ROC point with ``fpr < 0.01``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from memguard.errors import UserError
from memguard.guidance import detection_score

SCORES = ("detection_first", "detection_mean", "d_fall")


@dataclass
class Detection:
    """The ``metrics.detection`` settings: how many steps ``detection_mean`` averages and where labels come from.

    ``labels``: ``group`` (prompts in ``positive`` groups are memorized, in ``negative`` groups not, others left
    out; each positive group is also scored alone against the negatives, ``groups``) or ``copy`` (an image whose ``similarity`` exceeds ``metrics.copy_threshold`` is memorized: needs the
    similarity stage; the copy threshold is ``metrics.copy_threshold``, else ``metrics.threshold``)."""

    steps: int = 10
    labels: str = "group"
    positive: list[str] = field(default_factory=lambda: ["trigger"])
    negative: list[str] = field(default_factory=lambda: ["unique"])

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps} must be an integer >= 1")
        if self.labels not in ("group", "copy"):
            raise ValueError(f"labels={self.labels!r} must be group or copy")
        self.positive, self.negative = [str(g) for g in self.positive], [str(g) for g in self.negative]


def d_matrix(run_dir: Path, generations: pd.DataFrame) -> torch.Tensor:
    """``d`` per generation (rows in ``generations.csv`` order) and step, from ``trajectories.csv``."""
    path = run_dir / "trajectories.csv"
    if not path.is_file():
        raise UserError(f"run_dir={str(run_dir)!r} has no trajectories.csv; run `memguard run` with the same settings first")
    wide = pd.read_csv(path).pivot(index=["prompt_idx", "seed"], columns="step", values="d")
    keys = pd.MultiIndex.from_arrays([generations.prompt_idx, generations.seed])
    return torch.tensor(wide.loc[keys].to_numpy(), dtype=torch.float64)


def per_image(d: torch.Tensor, steps: int) -> dict[str, np.ndarray]:
    """The per-image scores of the module docstring, for ``d`` of shape ``(N, steps_total)``."""
    peak = d.argmax(dim=1)
    top = d.max(dim=1).values
    return {"detection_first": detection_score(d, 1).numpy(), "detection_mean": detection_score(d, steps).numpy(),
            "d_peak_step": peak.numpy(), "d_fall": (1 - d[:, -1] / top.clamp(min=1e-30)).numpy()}


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates and thresholds, one point per distinct score, highest threshold first
    (a point ``(0, 0)`` at threshold ``+inf`` leads), as ``sklearn.metrics.roc_curve`` without dropping points."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order].astype(bool)
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]  # last index of every distinct score
    tp, fp = np.cumsum(labels)[last], np.cumsum(~labels)[last]
    return (np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1), np.r_[np.inf, scores[last]])


def roc_summary(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Area under the ROC curve (trapezoids) and the TPR at 1% FPR (Wen et al.'s: last point with fpr < 0.01)."""
    fpr, tpr, _ = roc(scores, labels)
    return {"auc": float(np.trapezoid(tpr, fpr)), "tpr_at_1pct_fpr": float(tpr[np.nonzero(fpr < 0.01)[0][-1]])}


def labels_for(settings: Detection, generations: pd.DataFrame, copy_threshold: float | None) -> tuple[np.ndarray, str]:
    """Per generation 1 (memorized), 0 (not) or -1 (left out), and a description of where the labels came from."""
    if settings.labels == "copy":
        if "similarity" not in generations or copy_threshold is None:
            raise UserError("metrics.detection.labels=copy needs the similarity stage with metrics.copy_threshold set; "
                            "use metrics.detection.labels=group, or a metrics config with a calibrated copy threshold")
        return (generations.similarity.to_numpy() > copy_threshold).astype(int), f"copy (similarity > {copy_threshold})"
    groups = generations.group.astype(str) if "group" in generations else pd.Series([""] * len(generations))
    labels = np.where(groups.isin(settings.positive), 1, np.where(groups.isin(settings.negative), 0, -1))
    return labels, f"group ({', '.join(settings.positive)} vs {', '.join(settings.negative)})"


def detection_stage_result(settings: Detection, run_dir: Path, generations: pd.DataFrame,
                           copy_threshold: float | None) -> dict:
    """Adds the per-image columns to ``generations``; returns the aggregate and draws ``roc.png``."""
    d = d_matrix(run_dir, generations)
    for name, values in per_image(d, settings.steps).items():
        generations[name] = values
    labels, source = labels_for(settings, generations, copy_threshold)
    generations["memorized"] = pd.array([None if v < 0 else bool(v) for v in labels], dtype="boolean")
    result: dict = {"score": f"sqrt(d_t): first step; mean of steps 0..{settings.steps - 1}", "steps": settings.steps,
                    "labels": source, "n_positive": int((labels == 1).sum()), "n_negative": int((labels == 0).sum())}
    if result["n_positive"] and result["n_negative"]:
        keep = labels >= 0
        result.update({name: roc_summary(generations[name].to_numpy()[keep], labels[keep]) for name in SCORES})
        write_roc(run_dir / "roc.png", {name: generations[name].to_numpy()[keep] for name in SCORES}, labels[keep],
                  source, settings.steps)
        if settings.labels == "group":
            result.update(group_summaries(settings, generations, labels))
    return {"detection": result}


def group_summaries(settings: Detection, generations: pd.DataFrame, labels: np.ndarray) -> dict:
    """``{"groups": {g: ...}}``: each positive group that has images against all the negative groups' images."""
    groups = generations.group.astype(str).to_numpy()
    out = {}
    for group in settings.positive:
        mine = groups == group
        if not mine.any():
            continue
        keep = mine | (labels == 0)
        out[group] = {"n_positive": int(mine.sum()),
                      **{name: roc_summary(generations[name].to_numpy()[keep], labels[keep]) for name in SCORES}}
    return {"groups": out} if out else {}


def write_roc(path: Path, scores: dict[str, np.ndarray], labels: np.ndarray, source: str, steps: int) -> None:
    import matplotlib  # start-up: matplotlib loads only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # start-up: as above

    names = {"detection_first": "sqrt(d) at step 0 (Wen et al.)", "detection_mean": f"mean sqrt(d), steps 0-{steps - 1}",
             "d_fall": "fall of d_t after its peak"}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, values in scores.items():
        fpr, tpr, _ = roc(values, labels)
        ax.plot(fpr, tpr, label=f"{names[name]}: AUC {roc_summary(values, labels)['auc']:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"memorization detection\nlabels: {source}; {int(labels.sum())} vs {int((labels == 0).sum())} images",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def threshold_at(scores: np.ndarray, fpr: float) -> float:
    """The value above which at most ``fpr`` of ``scores`` lie (the ``floor(fpr n)``-th largest score)."""
    if not 0 < fpr < 1:
        raise UserError(f"fpr={fpr} must lie in (0, 1), e.g. 0.01")
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    return float(ordered[int(np.floor(fpr * len(ordered)))])


def sampler_record(cfg: DictConfig) -> dict[str, Any]:
    """The sampler a calibration's scores were taken with (name, steps): the scores are ``d``, losses or
    predictions at its timesteps, so a run sampled otherwise is refused (memguard.mitigations.calibration)."""
    return {"name": str(cfg.sampler.name), "steps": int(cfg.sampler.steps)}


def run_sampler(run_dir: Path) -> dict[str, Any] | None:
    """:func:`sampler_record` of a run folder's ``config.yaml``, or None where it has none."""
    path = run_dir / "config.yaml"
    config = OmegaConf.load(path) if path.is_file() else None
    return None if config is None or config.get("sampler") is None else sampler_record(config)


def calibrate(run_dir: Path, fpr: float, detect_step: int = 0, groups: list[str] | None = None) -> dict:
    """The threshold on the score over steps ``0..detect_step`` above which at most ``fpr`` of the run's images
    (those of ``groups``, all if None; the run should be standard CFG on prompts not memorized) lie; written to
    ``run_dir/calibration.json``, where ``mitigation=auto`` looks by default, with the run's sampler (``d`` at
    other timesteps is another score: a run sampled otherwise is refused, memguard.mitigations.calibration)."""
    table = run_dir / "generations.csv"
    if not table.is_file():
        raise UserError(f"{run_dir} has no generations.csv; make it with `memguard run mitigation=none` first")
    generations = pd.read_csv(table)
    if groups:
        generations = generations[generations.group.astype(str).isin(groups)]
        if generations.empty:
            raise UserError(f"--group {' '.join(groups)}: no image of {run_dir} is in these groups")
    scores = detection_score(d_matrix(run_dir, generations), detect_step + 1).numpy()
    threshold = threshold_at(scores, fpr)  # the rule `memguard calibrate mitigation=auto` applies
    result = {"threshold": threshold, "detect_step": detect_step, "fpr": fpr,
              "measured_fpr": float((scores > threshold).mean()), "n_images": len(scores),
              "groups": groups, "run_dir": str(run_dir),
              "sampler": run_sampler(run_dir)}
    (run_dir / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
