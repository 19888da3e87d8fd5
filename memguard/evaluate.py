"""``evaluate(cfg)``: score a finished run folder; each stage runs when ``cfg.metrics`` sets it.

- ``metrics.similarity`` (an embedder): per image ``similarity`` and ``nearest_reference`` (max cosine over the
  reference images ``cfg.references``); aggregate 95th percentile, mean, std, fraction above ``threshold`` and
  above ``copy_threshold`` (where the scenario calibrated one).
- ``metrics.alignment`` (a scorer): per image ``alignment``, scored against the prompt the run was asked for
  (``generations.csv``'s ``prompt``, also where a baseline changed what the model saw); aggregate mean, std.
- ``metrics.fid`` (a feature extractor): Frechet distance of the generations' features to the references'.
- ``metrics.detection`` (:class:`~memguard.metrics.detection.Detection`): per image Wen et al.'s score and the
  shape of ``d_t``; with labels (prompt groups, or copies from the similarity stage) ROC-AUC, TPR at 1% FPR and
  ``roc.png``.
- ``metrics.aesthetic``, ``metrics.diversity``, ``metrics.dino`` (metrics=paper_plus, ``+extra_metrics=...``):
  per image the LAION aesthetic score (``aesthetic``); per prompt the mean LPIPS over its image pairs
  (``diversity``, on each of its images' rows; aggregated over prompts); per image the DINOv2 similarity to the
  nearest reference (``dino_similarity``, ``dino_nearest_reference``; aggregated as similarity, with
  ``copy_fraction`` above ``metrics.dino.threshold``). With both copy scores, ``agreement`` counts where they
  disagree (memguard.metrics.agreement) and the report shows those images.

Every aggregate names the network that made it and, where the prompts carry groups (``generations.csv``'s
``group``: a prompt file's group column, ``group_labels``, ``prompts_group``, the control prompts' ``control_group``),
is also given per group. Re-evaluating replaces these columns and entries; images are never touched.

Per-group entries of ``metrics.json`` (present where the run has more than one group; prompts without a group are
in the totals only):

- ``similarity.groups.<g>``: p95, mean, std, fraction above threshold, ``copy_fraction``; a group without
  references (the control prompts where each prompt has its own references) has none, and
  ``similarity.controls_not_compared`` counts its prompts;
- ``alignment.groups.<g>``: mean, std;
- ``fid.groups.<g>``: ``value`` and ``generations``: the FID of the group's generations against all the
  references (a group of fewer than 2 images has none);
- ``transition.groups.<g>``: fired fraction, mean and median step, histogram (written by the run);
- ``detection.groups.<g>`` (labels ``group``): each positive group against the negative groups: ``n_positive``,
  and per score ``auc``, ``tpr_at_1pct_fpr``; the top-level scores are all positive groups against them;
- ``cost`` (runs with control prompts): ``cost.control.<control_group>``: the control prompts' ``n_images``,
  ``alignment`` and ``fid`` (where computed): what a mitigation costs ordinary prompts; ``cost.memorized.<g>``:
  each other group's ``similarity_mean``, ``similarity_p95``, ``copy_fraction`` and ``alignment``, what it
  should lose. Comparing two runs (a mitigation against ``none``) gives the trade-off.

Intervals: every mean, percentile and fraction above (similarity ``p95``, ``mean``, ``frac_above_<t>``,
``copy_fraction``; alignment ``mean``), overall and per group, has its 95% bootstrap interval over prompts
beside it as ``<name>_lo`` and ``<name>_hi`` (:mod:`memguard.metrics.bootstrap`: 1000 resamples of the prompts
with replacement, each taking all of its prompt's images, numpy seed 0; null where fewer than two prompts were
scored). ``metrics.json``'s ``bootstrap`` entry records the method, level, resamples and seed. Every other key
and value is as before, so readers of older folders (which have no ``_lo`` / ``_hi``) keep working. Standard
deviations have no interval. FID has none either: it is not a mean over images, and an interval over prompts
would need every generation's features kept and the Frechet distance recomputed per resample (1000 matrix square
roots of 2048 x 2048 for Inception, about 4 s each on one CPU thread: over an hour), which memguard does
not do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from memguard.errors import UserError, instantiate_checked
from memguard.metrics.agreement import agreement
from memguard.metrics.bootstrap import Above, Percentile, describe, intervals, with_intervals
from memguard.metrics.detection import detection_stage_result
from memguard.metrics.fid import fid_of_files
from memguard.metrics.images import REMAKE_FIX, Unreadable, image_batches, transform_of
from memguard.metrics.similarity import embed_files, nearest_references, summarize
from memguard.runs.folder import atomic_write_text, update_metrics
from memguard.runs.report import write_agreement, write_grid, write_report

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_files(folder: str | Path | None, key: str = "references") -> list[Path]:
    """The image files of a reference folder, sorted by name (searched recursively)."""
    if folder is None:
        raise UserError(f"{key} is not set; give {key}=DIR, a folder of the reference (training) images")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{key}={str(folder)!r} is not a folder; give a folder of the reference (training) images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{key}={str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def prompt_ids(generations: pd.DataFrame) -> np.ndarray:
    """Each generation's prompt (``prompt_idx``), the unit the bootstrap intervals resample."""
    return generations.prompt_idx.to_numpy() if "prompt_idx" in generations else np.arange(len(generations))


def by_group(generations: pd.DataFrame, column: str,
             summary: Callable[[torch.Tensor, np.ndarray], dict[str, Any]]) -> dict:
    """``summary`` of ``column`` (and the rows' prompts) for every prompt group, where there is more than one."""
    if "group" not in generations or generations.group.nunique() < 2:
        return {}
    return {"groups": {str(g): summary(torch.tensor(rows[column].to_numpy()), prompt_ids(rows))
                       for g, rows in generations.groupby("group", sort=False)}}


def control_rows(cfg: DictConfig, generations: pd.DataFrame) -> "pd.Series[bool]":
    """Per generation, whether its prompt is a control prompt (``control_prompts_file``, group ``control_group``)."""
    if cfg.get("control_prompts_file") is None or "group" not in generations:
        return pd.Series(False, index=generations.index)
    return generations.group.astype(str) == str(cfg.get("control_group") or "unmemorized")


def similarity_summary(values: torch.Tensor, prompts: np.ndarray, threshold: float,
                       copy_threshold: float | None) -> dict[str, Any]:
    """The similarity aggregate of some images (NaNs left out) with the intervals over their ``prompts``."""
    keep = ~torch.isnan(values)
    values, prompts = values[keep], prompts[keep.numpy()]
    out = summarize(values, threshold)
    x = values.double().numpy()
    statistics = {"p95": (x, Percentile(95)), "mean": (x, "mean"), f"frac_above_{threshold:g}": (x, Above(threshold))}
    if copy_threshold is not None:
        out["copy_fraction"] = float((values > copy_threshold).double().mean())
        statistics["copy_fraction"] = (x, Above(copy_threshold))
    return with_intervals(out, intervals(prompts, statistics))


def alignment_summary(values: torch.Tensor, prompts: np.ndarray) -> dict[str, Any]:
    """The alignment aggregate (mean, std) of some images with the mean's interval over their ``prompts``."""
    out = {"mean": float(values.double().mean()), "std": float(values.double().std(unbiased=False))}
    return with_intervals(out, intervals(prompts, {"mean": (values.double().numpy(), "mean")}))


def reference_groups(generations: pd.DataFrame, references: list[Path], root: Path) -> list[list[int]] | None:
    """Per generation, the indices of the references in its prompt's own subfolder ``root/<reference_key>/``
    (references_per_prompt; an empty list where that folder has no images: the generation is left out), or None
    when generations are compared with every reference."""
    if "reference_key" not in generations or generations.reference_key.isna().all():
        return None
    by_folder: dict[str, list[int]] = {}
    for i, file in enumerate(references):
        by_folder.setdefault(file.relative_to(root).parts[0], []).append(i)
    if not any(str(k) in by_folder for k in generations.reference_key):
        missing = sorted({str(k) for k in generations.reference_key})
        raise UserError(f"references={str(root)!r} has no images in the subfolder(s) {', '.join(missing[:5])} "
                        f"that prompts name (references_per_prompt); each prompt needs its own ground-truth folder")
    return [by_folder.get(str(k), []) for k in generations.reference_key]


def nearest_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path],
                  stage: str = "similarity", column: str = "similarity", threshold: float | None = None,
                  copy_threshold: float | None = None) -> dict[str, Any]:
    """Per generation its nearest reference under the embedder ``metrics.<stage>`` (``column`` and
    ``nearest_reference``, or ``<stage>_nearest_reference`` for another stage), and the
    similarity aggregate, overall and per group."""
    embedder = instantiate_checked(cfg.metrics[stage], f"metrics.{stage}")
    threshold = cfg.metrics.threshold if threshold is None else threshold
    nearest_column = "nearest_reference" if stage == "similarity" else f"{stage}_nearest_reference"
    root = Path(cfg.references).expanduser()
    log.info("%s with %s: %d generations vs %d references", stage, embedder.name, len(generations), len(references))
    generated = embed_files([run_dir / f for f in generations.file], embedder, num_workers=cfg.image_workers,
                            key=f"run_dir={str(run_dir)!r}", fix=REMAKE_FIX)
    skipped: list[Path] | None = [] if cfg.skip_unreadable else None
    embedded = embed_files(references, embedder, cache_dir=cfg.paths.cache_dir, num_workers=cfg.image_workers,
                           skipped=skipped, key=f"references={str(cfg.references)!r}")
    references = [f for f in references if f not in set(skipped or [])]
    groups = reference_groups(generations, references, root)
    kept = [i for i in range(len(generations)) if groups is None or groups[i]]  # a prompt without references: left out
    nearest = nearest_references(generated[kept], embedded, groups=None if groups is None else [groups[i] for i in kept])
    similarity = torch.full((len(generations),), float("nan"), dtype=nearest.similarity.dtype)
    similarity[kept] = nearest.similarity
    names = [""] * len(generations)
    for i, j in zip(kept, nearest.index.tolist()):
        names[i] = str(references[j].relative_to(root))
    generations[column] = similarity.numpy()
    generations[nearest_column] = names
    controls = control_rows(cfg, generations)
    without = sorted({str(k) for i, k in enumerate(generations.get("reference_key", []))
                      if groups and not groups[i] and not controls[i]})
    not_compared = int(generations.loc[controls, "prompt_idx"].nunique()) if groups and controls.any() else 0
    if without:
        log.warning("%d prompt(s) have no reference images (references_per_prompt): left out of %s: %s",
                    len(without), stage, ", ".join(without[:10]))
    coverage = None
    if groups is not None:  # each prompt against its own references: how many prompts have any (links decay)
        own = {str(k) for i, k in enumerate(generations.get("reference_key", [])) if not controls[i]}
        coverage = {"with": len(own) - len(without), "of": len(own)}
        log.info("references: %d of %d prompts have references", coverage["with"], coverage["of"])

    def summary(values: torch.Tensor, prompts: np.ndarray) -> dict[str, Any]:
        return similarity_summary(values, prompts, threshold, copy_threshold)

    def group_summary(values: torch.Tensor, prompts: np.ndarray) -> dict[str, Any] | None:  # None: no references
        return summary(values, prompts) if (~torch.isnan(values)).any() else None

    per_group = by_group(generations, column, group_summary)
    if per_group:
        per_group["groups"] = {g: v for g, v in per_group["groups"].items() if v is not None}
    result = {"embedder": embedder.name, "threshold": threshold,
              "copy_threshold": copy_threshold, "references": len(references),
              **({"references_skipped": [str(f.relative_to(root)) for f in skipped]} if skipped else {}),
              **({"prompts_without_references": len(without), "reference_keys_missing": without} if without else {}),
              **({"controls_not_compared": not_compared} if not_compared else {}),
              **({"reference_coverage": coverage} if coverage else {}),
              **summary(similarity, prompt_ids(generations)), **per_group}
    log.info("%s p95 %.4f, mean %.4f +- %.4f", stage, result["p95"], result["mean"], result["std"])
    return {stage: result}


def similarity_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame,
                     references: list[Path]) -> dict[str, Any]:
    return nearest_stage(cfg, run_dir, generations, references, copy_threshold=cfg.metrics.copy_threshold)


def dino_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path]) -> dict[str, Any]:
    """DINOv2 similarity to the nearest reference (memguard.metrics.dino): a second copy score, with its own
    threshold (``metrics.dino.threshold``) for its ``copy_fraction``."""
    threshold = float(cfg.metrics.dino.get("threshold", 0.5))
    out = nearest_stage(cfg, run_dir, generations, references, "dino", "dino_similarity", threshold, threshold)
    calibrated = bool(cfg.metrics.dino.get("calibrated", False))
    if not calibrated:
        log.warning("metrics.dino.threshold=%s was not calibrated on this model and data (its copy_fraction is a "
                    "guess): set metrics.dino.threshold and metrics.dino.calibrated=true", threshold)
    out["dino"]["threshold_calibrated"] = calibrated
    return out


def alignment_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path],
                    batch_size: int = 64) -> dict[str, Any]:
    scorer = instantiate_checked(cfg.metrics.alignment, "metrics.alignment")
    score, prompts = getattr(scorer, "score", scorer), list(generations.prompt)
    scores, unreadable = torch.full((len(generations),), float("nan")), Unreadable()
    for index, tensors in tqdm(image_batches([run_dir / f for f in generations.file], transform_of(scorer), batch_size,
                                             cfg.image_workers, unreadable), desc="alignment", disable=not cfg.progress):
        for shape in {t.shape for t in tensors}:  # images of one shape per call
            rows = [k for k, t in enumerate(tensors) if t.shape == shape]
            scores[[index[k] for k in rows]] = score(torch.stack([tensors[k] for k in rows]),
                                                     [prompts[index[k]] for k in rows]).float()
    if unreadable.files:
        raise unreadable.error(f"run_dir={str(run_dir)!r}", REMAKE_FIX)
    generations["alignment"] = scores.numpy()

    result = {"scorer": scorer.name,
              **alignment_summary(torch.tensor(generations.alignment.to_numpy()), prompt_ids(generations)),
              **by_group(generations, "alignment", alignment_summary)}
    log.info("alignment (%s) %.4f +- %.4f", scorer.name, result["mean"], result["std"])
    return {"alignment": result}


def aesthetic_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path]) -> dict[str, Any]:
    """Per image the LAION aesthetic score (memguard.metrics.aesthetic); aggregate mean, std, per group."""
    scorer = instantiate_checked(cfg.metrics.aesthetic, "metrics.aesthetic")
    scores = embed_files([run_dir / f for f in generations.file], scorer, num_workers=cfg.image_workers,
                         key=f"run_dir={str(run_dir)!r}", fix=REMAKE_FIX)
    generations["aesthetic"] = scores.numpy()
    result = {"scorer": scorer.name, **alignment_summary(scores, prompt_ids(generations)),
              **by_group(generations, "aesthetic", alignment_summary)}
    log.info("aesthetic (%s) %.4f +- %.4f", scorer.name, result["mean"], result["std"])
    return {"aesthetic": result}


def diversity_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path]) -> dict[str, Any]:
    """Per prompt the mean LPIPS over every pair of its images (memguard.metrics.diversity), written on each of
    its images' rows; aggregate the mean over prompts (each prompt once), std, per group."""
    network = instantiate_checked(cfg.metrics.diversity, "metrics.diversity")
    values = pd.Series(np.nan, index=generations.index)
    for _, rows in tqdm(generations.groupby(prompt_ids(generations), sort=False), desc="diversity",
                        disable=not cfg.progress):
        unreadable = Unreadable()
        images = [t for _, batch in image_batches([run_dir / f for f in rows.file], network.transform,
                                                  len(rows), 0, unreadable) for t in batch]
        if unreadable.files:
            raise unreadable.error(f"run_dir={str(run_dir)!r}", REMAKE_FIX)
        values[rows.index] = network.mean_pairwise(images)
    generations["diversity"] = values.to_numpy()
    first = generations.drop_duplicates(subset="prompt_idx") if "prompt_idx" in generations else generations

    def summary(x: torch.Tensor, prompts: np.ndarray) -> dict[str, Any]:
        keep = ~torch.isnan(x)
        return alignment_summary(x[keep], prompts[keep.numpy()]) if keep.any() else {"mean": None, "std": None}

    result = {"network": network.name, "pairs": "every pair of a prompt's images, mean per prompt",
              "prompts": int(first.diversity.notna().sum()),
              **summary(torch.tensor(first.diversity.to_numpy()), prompt_ids(first)),
              **by_group(first, "diversity", summary)}
    log.info("diversity (%s) %s", network.name, result["mean"])
    return {"diversity": result}


def fid_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path]) -> dict[str, Any]:
    features = instantiate_checked(cfg.metrics.fid, "metrics.fid")
    skipped: list[Path] | None = [] if cfg.skip_unreadable else None
    value = fid_of_files([run_dir / f for f in generations.file], references, features, cfg.paths.cache_dir,
                         cfg.image_workers, skipped, generated_key=f"run_dir={str(run_dir)!r}",
                         reference_key=f"references={str(cfg.references)!r}", generated_fix=REMAKE_FIX)
    log.info("%s %.3f with %s", features.kind, value, features.name)
    groups = {}
    if "group" in generations and generations.group.nunique() > 1:
        for group, rows in generations.groupby("group", sort=False):
            if len(rows) < 2:  # FID needs two images on each side
                continue
            groups[str(group)] = {"value": fid_of_files(
                [run_dir / f for f in rows.file], references, features, cfg.paths.cache_dir, cfg.image_workers,
                [] if skipped is not None else None, generated_key=f"run_dir={str(run_dir)!r}",
                reference_key=f"references={str(cfg.references)!r}", generated_fix=REMAKE_FIX),
                "generations": len(rows)}
    return {"fid": {"kind": features.kind, "features": features.name, "value": value,
                    "generations": len(generations), "references": len(references) - len(skipped or []),
                    **({"references_skipped": [str(f) for f in skipped]} if skipped else {}),
                    **({"groups": groups} if groups else {})}}


def detection_stage(cfg: DictConfig, run_dir: Path, generations: pd.DataFrame, references: list[Path]) -> dict[str, Any]:
    settings = instantiate_checked(cfg.metrics.detection, "metrics.detection")
    copy = cfg.metrics.copy_threshold if cfg.metrics.copy_threshold is not None else cfg.metrics.threshold
    result = detection_stage_result(settings, run_dir, generations, copy)
    log.info("detection (%s): %s", result["detection"]["labels"],
             {k: v for k, v in result["detection"].items() if isinstance(v, dict)})
    return result


def cost_section(cfg: DictConfig, generations: pd.DataFrame, results: dict[str, Any]) -> dict[str, Any]:
    """``cost`` (module docstring): the control group's alignment and FID beside the memorized groups' similarity,
    copies and alignment, from the per-group entries just computed; empty for a run without control prompts."""
    controls = control_rows(cfg, generations)
    if not controls.any():
        return {}
    control = str(cfg.get("control_group") or "unmemorized")

    def entry(stage: str, group: str, key: str) -> float | None:
        return ((results.get(stage) or {}).get("groups") or {}).get(group, {}).get(key)

    out: dict[str, Any] = {"n_images": int(controls.sum())}
    for stage, key, name in (("alignment", "mean", "alignment"), ("fid", "value", "fid"),
                             ("aesthetic", "mean", "aesthetic"), ("diversity", "mean", "diversity")):
        if entry(stage, control, key) is not None:
            out[name] = entry(stage, control, key)
    memorized = {}
    for group in dict.fromkeys(generations.group[~controls].dropna().astype(str)):
        row = {"n_images": int((generations.group.astype(str) == group).sum())}
        for stage, key, name in (("similarity", "mean", "similarity_mean"), ("similarity", "p95", "similarity_p95"),
                                 ("similarity", "copy_fraction", "copy_fraction"), ("alignment", "mean", "alignment"),
                                 ("dino", "copy_fraction", "dino_copy_fraction")):
            if entry(stage, group, key) is not None:
                row[name] = entry(stage, group, key)
        memorized[group] = row
    return {"control": {control: out}, "memorized": memorized}


# stage name (the ``metrics`` key that turns it on) -> (stage, whether it compares with the reference images)
STAGES = {"similarity": (similarity_stage, True), "alignment": (alignment_stage, False), "fid": (fid_stage, True),
          "detection": (detection_stage, False), "aesthetic": (aesthetic_stage, False),
          "diversity": (diversity_stage, False), "dino": (dino_stage, True)}


def planned_stages(cfg: DictConfig) -> list[str]:
    """The stages ``cfg.metrics`` sets; a UserError, before any work, if they need references and none are set."""
    names = [name for name in STAGES if cfg.metrics.get(name) is not None]
    if cfg.references is None and any(STAGES[name][1] for name in names):
        raise UserError(f"metrics={cfg.metrics.name} compares with reference images but references is not set; "
                        "give references=DIR, or evaluate=false")
    return names


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every metric stage ``cfg.metrics`` sets on the folder ``cfg.run_dir``; return its metrics."""
    names = planned_stages(cfg)
    if not names:
        raise UserError(f"metrics={cfg.metrics.name} sets no metric: choose metrics=pixel, tiny, sscd or paper")
    run_dir = Path(cfg.run_dir)
    table = run_dir / "generations.csv"
    if not table.is_file():
        raise UserError(f"run_dir={str(run_dir)!r} has no generations.csv; run `memguard run` with the same settings first")
    generations = pd.read_csv(table, dtype={"reference_key": object})  # keys stay as written (not 7.0 beside NaN)
    references = reference_files(cfg.references) if any(STAGES[name][1] for name in names) else []
    results: dict[str, Any] = {}
    for name in names:
        results.update(STAGES[name][0](cfg, run_dir, generations, references))
    if "similarity" in results and "dino" in results:  # two copy detectors: where they disagree
        sim, dino = results["similarity"], results["dino"]
        results["agreement"] = agreement(generations, sim["embedder"], sim["copy_threshold"] if sim["copy_threshold"]
                                         is not None else sim["threshold"], dino["embedder"], dino["threshold"])
    if any(k in results for k in ("similarity", "alignment", "aesthetic", "diversity", "dino")):
        results["bootstrap"] = describe()  # how their _lo / _hi intervals were computed
    atomic_write_text(table, generations.to_csv(index=False))  # readers never see half a table
    cost = cost_section(cfg, generations, results)
    if cost:
        results["cost"] = cost
    metrics = update_metrics(run_dir, results)
    write_grid(run_dir)  # now with the nearest references and copies outlined
    write_agreement(run_dir)
    write_report(run_dir)
    return metrics
