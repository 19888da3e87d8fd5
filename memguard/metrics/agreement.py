"""Where the two copy scores disagree: the similarity stage's (``similarity``: SSCD with metrics=paper; the
embedder is named, a pixel score is never called SSCD) and DINOv2's (``dino_similarity``).

Each image is a copy for a detector when its score is above that detector's threshold (similarity: the
scenario's ``copy_threshold``, else ``threshold``; DINO: ``metrics.dino.threshold``). ``metrics.json``'s
``agreement`` counts the images both call copies, each alone, and neither, with Cohen's kappa; the report shows
the images one detector calls a copy and the other does not, each beside both nearest references
(``agreement.png``), so a researcher can see which detector to trust on this data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ("similarity", "dino_similarity")


def verdicts(generations: pd.DataFrame, similarity_threshold: float, dino_threshold: float) -> pd.DataFrame:
    """The rows scored by both detectors, with ``similarity_copy``, ``dino_copy`` and ``disagree`` (booleans)."""
    scored = generations.dropna(subset=list(COLUMNS)).copy()
    scored["similarity_copy"] = scored.similarity > similarity_threshold
    scored["dino_copy"] = scored.dino_similarity > dino_threshold
    scored["disagree"] = scored.similarity_copy != scored.dino_copy
    return scored


def kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean verdicts (None where chance agreement is 1: both constant and equal)."""
    if not len(a):
        return None
    observed = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    chance = pa * pb + (1 - pa) * (1 - pb)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement(generations: pd.DataFrame, similarity_by: str, similarity_threshold: float,
              dino_by: str, dino_threshold: float) -> dict[str, Any] | None:
    """``metrics.json``'s ``agreement`` section (``*_by``: the two embedders' names), or None where the images
    lack either score."""
    if not all(c in generations for c in COLUMNS):
        return None
    v = verdicts(generations, similarity_threshold, dino_threshold)
    s, d = v.similarity_copy.to_numpy(), v.dino_copy.to_numpy()
    return {"similarity_by": similarity_by, "similarity_threshold": similarity_threshold, "dino_by": dino_by,
            "dino_threshold": dino_threshold, "images": len(v), "both_copy": int((s & d).sum()),
            "similarity_only": int((s & ~d).sum()), "dino_only": int((~s & d).sum()), "neither": int((~s & ~d).sum()),
            "kappa": kappa(s, d)}
