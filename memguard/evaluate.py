"""``evaluate(cfg)``: score a finished run folder against its scenario's reference images.

Adds per-image columns ``similarity`` and ``nearest_reference`` to ``generations.csv`` and a ``similarity``
entry to ``metrics.json`` (95th percentile, mean, std, fraction above the threshold, and the embedder that made
them). Re-evaluating a folder replaces those columns and that entry; the images are never touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from memguard.errors import UserError, instantiate_checked
from memguard.metrics.similarity import Embedder, embed_files, nearest_references, summarize
from memguard.runner import update_metrics

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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Similarity of every generation in ``cfg.run_dir`` to its nearest image in ``cfg.references``."""
    # 1. Inputs
    if cfg.metrics.name == "none":
        raise UserError("metrics=none: choose metrics=pixel, or metrics=sscd metrics.similarity.path=FILE")
    run_dir = Path(cfg.run_dir)
    table = run_dir / "generations.csv"
    if not table.is_file():
        raise UserError(f"run_dir={str(run_dir)!r} has no generations.csv; run `memguard run` with the same settings first")
    generations = pd.read_csv(table)
    references = reference_files(cfg.references)
    embedder: Embedder = instantiate_checked(cfg.metrics.similarity, "metrics.similarity")

    # 2. Embeddings (references cached by content) and nearest references
    log.info("similarity with %s: %d generations vs %d references", embedder.name, len(generations), len(references))
    ref_embeddings = embed_files(references, embedder, cache_dir=cfg.paths.cache_dir)
    gen_embeddings = embed_files([run_dir / f for f in generations.file], embedder)
    nearest = nearest_references(gen_embeddings, ref_embeddings)

    # 3. Per-image columns and the aggregate
    root = Path(cfg.references).expanduser()
    generations["similarity"] = nearest.similarity.numpy()
    generations["nearest_reference"] = [str(references[i].relative_to(root)) for i in nearest.index.tolist()]
    generations.to_csv(table, index=False)
    summary = {"embedder": embedder.name, "threshold": cfg.metrics.threshold, "references": len(references),
               **summarize(nearest.similarity, cfg.metrics.threshold)}
    log.info("similarity p95 %.4f, mean %.4f +- %.4f", summary["p95"], summary["mean"], summary["std"])
    return update_metrics(run_dir, {"similarity": summary})
