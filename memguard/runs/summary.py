"""``metrics.json`` for people: numbers to 3 significant digits with their bootstrap intervals, per prompt group,
and what each number was measured with, said once. Shared by a run's ``report.html`` and ``memguard tables``.

A value and its interval print with one number of decimals, the one that gives the largest of the three 3
significant digits: ``0.512 [0.491, 0.533]``, ``0.143 [0.000, 0.357]``, ``1.00 [1.00, 1.00]``, ``1740``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# The sections of metrics.json the summaries name, and the key holding the network that made them.
NETWORK_KEYS = {"similarity": "embedder", "alignment": "scorer", "fid": "features", "dino": "embedder",
                "aesthetic": "scorer", "diversity": "network"}
# The optional sections (metrics=paper_plus): section -> (its headline column, the key it shows)
OPTIONAL = {"dino": ("DINO copy fraction", "copy_fraction"), "aesthetic": ("aesthetic", "mean"),
            "diversity": ("LPIPS diversity", "mean")}


def _number(x: Any) -> float | None:
    """``x`` as a float, or None where it is missing, NaN or not a number."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(float(x)) else float(x)


def decimals(x: float, digits: int = 3) -> int:
    """Decimals that show ``x`` to ``digits`` significant digits (0 for large numbers and for 0)."""
    return 0 if x == 0 or not math.isfinite(x) else max(0, digits - 1 - math.floor(math.log10(abs(x))))


def sig(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without exponent (``1742.5`` -> ``1740``); empty for None/NaN."""
    value = _number(x)
    if value is None:
        return "" if x is None or isinstance(x, float) else str(x)
    if not math.isfinite(value):
        return str(value)
    places = decimals(value, digits)
    if places == 0 and value != 0:
        value = round(value, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{places}f}"


def with_interval(value: Any, lo: Any = None, hi: Any = None, digits: int = 3) -> str:
    """``value [lo, hi]``, all with the decimals that show the largest of them to ``digits`` significant digits;
    the value alone where there is no interval."""
    v, a, b = _number(value), _number(lo), _number(hi)
    if v is None:
        return sig(value, digits)
    if a is None or b is None:
        return sig(v, digits)
    largest = max(abs(v), abs(a), abs(b))
    if largest == 0:
        return "0 [0, 0]"
    if decimals(largest, digits) == 0:
        return f"{sig(v, digits)} [{sig(a, digits)}, {sig(b, digits)}]"
    places = decimals(largest, digits)
    return f"{v:.{places}f} [{a:.{places}f}, {b:.{places}f}]"


def group_names(metrics: Mapping[str, Any]) -> list[str]:
    """Every prompt group any section of ``metrics`` reports (``<section>.groups.<g>``), in order of appearance."""
    names: dict[str, None] = {}
    for value in metrics.values():
        if isinstance(value, dict) and isinstance(value.get("groups"), dict):
            names.update(dict.fromkeys(str(g) for g in value["groups"]))
    return list(names)


def section(metrics: Mapping[str, Any], name: str, group: str | None = None) -> dict[str, Any] | None:
    """A section of ``metrics`` (None where absent); with ``group``, that group's entry under its ``groups`` with the
    section's descriptive (text) keys, or the whole section where it has no groups (FID over all images)."""
    whole = metrics.get(name)
    if not isinstance(whole, dict):
        return None
    if group is None or "groups" not in whole:
        return {k: v for k, v in whole.items() if k != "groups"}
    names = {k: v for k, v in whole.items() if isinstance(v, str) or k.endswith("threshold")}
    entry = whole["groups"].get(group)
    return {**names, **entry} if isinstance(entry, dict) else names


def networks(metrics: Mapping[str, Any]) -> dict[str, str]:
    """What made each section's numbers: ``{"similarity": ..., "alignment": ..., "fid": ...}`` (those present)."""
    out = {}
    sim, align, fid = (metrics.get(k) or {} for k in ("similarity", "alignment", "fid"))
    if sim.get("embedder"):
        threshold = sim.get("copy_threshold")
        out["similarity"] = sim["embedder"] + (f" (copy: similarity > {threshold:g})" if threshold is not None else "")
    if align.get("scorer"):
        out["alignment"] = align["scorer"]
    if fid.get("features"):
        out["fid"] = f"{fid.get('kind', 'fid')} of {fid['features']}"
    for name in OPTIONAL:
        entry = metrics.get(name) or {}
        if entry.get(NETWORK_KEYS[name]):
            out[name] = entry[NETWORK_KEYS[name]] + (f" (copy: similarity > {entry['threshold']:g}"
                                                     + ("" if entry.get("threshold_calibrated") else ", not calibrated")
                                                     + ")" if name == "dino" and entry.get("threshold") is not None else "")
    return out


def measured_with(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per kind of number: the network behind it, once; where runs differ, each network with its runs."""
    lines = []
    for kind in NETWORK_KEYS:
        by: dict[str, list[str]] = {}
        for run, metrics in runs.items():
            if kind in networks(metrics):
                by.setdefault(networks(metrics)[kind], []).append(run)
        if len(by) == 1:
            lines.append(f"{kind} by {next(iter(by))}")
        elif by:
            lines.append(f"{kind} by " + "; by ".join(f"{net} ({', '.join(rs)})" for net, rs in by.items()))
    return lines


def interval_note(metrics: Mapping[str, Any] | None = None) -> str:
    """How the bracketed intervals were computed, from ``metrics.json``'s ``bootstrap`` entry where given."""
    boot = (metrics or {}).get("bootstrap") or {"level": 0.95, "resamples": 1000, "seed": 0}
    return (f"[lo, hi]: {100 * boot.get('level', 0.95):g}% bootstrap interval over prompts ({boot.get('resamples')} "
            f"resamples of the prompts with replacement, each with all its images; numpy seed {boot.get('seed')}); "
            "none where fewer than two prompts, or for a folder evaluated before intervals")


def run_summary(metrics: Mapping[str, Any], counts: Mapping[str, tuple[int, int]] | None = None) -> list[dict[str, str]]:
    """A run's headline per prompt group (``all`` first): copies, similarity p95, alignment, FID (per group only
    where the stage gave it per group), the rows' prompts and images (``counts``: group -> (prompts, images)), and
    every number of any other section's per-group entries (``<section>.groups.<g>``), with its interval."""
    rows = []
    known = {"similarity", "alignment", "fid", *OPTIONAL}
    extra = [name for name, value in metrics.items()
             if name not in known and isinstance(value, dict) and isinstance(value.get("groups"), dict)]
    for group in [None, *group_names(metrics)]:
        label = group or "all"
        row: dict[str, str] = {"group": label}
        if counts and label in counts:
            row["prompts / images"] = f"{counts[label][0]} / {counts[label][1]}"
        sim, align, fid = (section(metrics, k, group) for k in ("similarity", "alignment", "fid"))
        if sim is not None:
            if "copy_fraction" in sim:
                row["copy fraction"] = with_interval(sim["copy_fraction"], sim.get("copy_fraction_lo"),
                                                     sim.get("copy_fraction_hi"))
            row["similarity p95"] = with_interval(sim.get("p95"), sim.get("p95_lo"), sim.get("p95_hi"))
        if align is not None:
            row["alignment"] = with_interval(align.get("mean"), align.get("mean_lo"), align.get("mean_hi"))
        if fid is not None:  # a group's row only where the FID stage gave one per group
            per_group = group is None or "groups" in (metrics.get("fid") or {})
            row[fid.get("kind", "fid")] = with_interval(fid.get("value"), fid.get("value_lo"),
                                                        fid.get("value_hi")) if per_group else ""
        for name, (column, key) in OPTIONAL.items():
            entry = section(metrics, name, group)
            if entry is not None and (group is None or "groups" in (metrics.get(name) or {})):
                row[column] = with_interval(entry.get(key), entry.get(f"{key}_lo"), entry.get(f"{key}_hi"))
        for name in extra:
            entry = section(metrics, name, group) or {}
            for key, value in entry.items():
                if _number(value) is not None and not key.endswith(("_lo", "_hi")):
                    row[f"{name} {key}"] = with_interval(value, entry.get(f"{key}_lo"), entry.get(f"{key}_hi"))
        rows.append(row)
    return rows
