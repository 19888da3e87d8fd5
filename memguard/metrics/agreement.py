"""Where the two copy scores disagree: SSCD's (``similarity``) and DINOv2's (``dino_similarity``).

Each image is a copy for a detector when its score is above that detector's threshold (SSCD: the scenario's
``copy_threshold``, else ``threshold``; DINO: ``metrics.dino.threshold``). ``metrics.json``'s ``agreement``
counts the images both call copies, each alone, and neither, with Cohen's kappa; the report shows the images
one detector calls a copy and the other does not, each beside both nearest references (``agreement.png``), so a
researcher can see which detector to trust on this data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ("similarity", "dino_similarity")


def verdicts(generations: pd.DataFrame, sscd_threshold: float, dino_threshold: float) -> pd.DataFrame:
    """The rows scored by both detectors, with ``sscd_copy``, ``dino_copy`` and ``disagree`` (booleans)."""
    scored = generations.dropna(subset=list(COLUMNS)).copy()
    scored["sscd_copy"] = scored.similarity > sscd_threshold
    scored["dino_copy"] = scored.dino_similarity > dino_threshold
    scored["disagree"] = scored.sscd_copy != scored.dino_copy
    return scored


def kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two boolean verdicts (None where chance agreement is 1: both constant and equal)."""
    if not len(a):
        return None
    observed = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    chance = pa * pb + (1 - pa) * (1 - pb)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def agreement(generations: pd.DataFrame, sscd_threshold: float, dino_threshold: float) -> dict[str, Any] | None:
    """``metrics.json``'s ``agreement`` section, or None where the images lack either score."""
    if not all(c in generations for c in COLUMNS):
        return None
    v = verdicts(generations, sscd_threshold, dino_threshold)
    s, d = v.sscd_copy.to_numpy(), v.dino_copy.to_numpy()
    return {"sscd_threshold": sscd_threshold, "dino_threshold": dino_threshold, "images": len(v),
            "both_copy": int((s & d).sum()), "sscd_only": int((s & ~d).sum()), "dino_only": int((~s & d).sum()),
            "neither": int((~s & ~d).sum()), "kappa": kappa(s, d)}
