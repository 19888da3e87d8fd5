"""PRSS (Chen et al., CVPR 2025, "Enhancing Privacy-Utility Trade-offs to Mitigate Memorization in Diffusion
Models"): prompt re-anchoring (PR) on top of a modified prompt, which is either Wen et al.'s optimised embedding
(PE) or a paraphrase found by semantic search (SS).

Their code: chenchen-usyd/BE-PRSS, commit fb2e942 (``local_sd_pipeline.py``, ``inference_mem.py``,
``README.md``); line numbers below are of that commit.

**PR** (:class:`PromptReanchoring`, slot ``mitigation.branches``). Each step evaluates three branches, the null
prompt ``eps_u``, the modified prompt ``eps_c`` (what the loop conditions on) and the image's original prompt
``eps_o`` (``local_sd_pipeline.py`` l. 193-208). With the schedule's scale ``g``, the re-anchoring target ``l``
(``l_target_pr``) and the magnitude threshold ``m`` (``mag_thres_pr``), where ``r = ||eps_c - eps_u||_p > l``
(l. 216-218):

    c    = (g l - m) / (g - 1)
    s_pr = min((r - c) / (m - c) g,  g)                              (s_pr = 1 at r = l, g at r >= m)
    eps  = eps_o + s_pr (eps_c - eps_o) + (g - s_pr) (eps_c - eps_u)   (l. 219-222)

otherwise plain CFG on the modified prompt, ``eps = eps_u + g (eps_c - eps_u)`` (l. 223-225); the two agree at
``r = l``. The re-anchoring runs only for images whose original prompt triggered it (``m_trigger``, below).

**m_trigger**: their ``aug_prompt`` / ``aug_prompt_ss`` set it when the original prompt's first-step magnitude
``||eps(x_T, original) - eps(x_T, null)||_2`` exceeds the optimisation's or the search's target
(``local_sd_pipeline.py`` l. 713-719, l. 925-936), i.e. Wen et al.'s detection at step 0 with that target. Here
``trigger`` is that threshold, measured on the loop's own first step (the third branch is the original prompt at
x_T), so it costs nothing more; ``trigger: null`` re-anchors every image. The trigger is measured in the units of
the target it is tied to: the model's raw outputs, as Wen's optimisation and the search measure their
``l_target`` (on a v-prediction model, v); the gate ``r`` and its ``target`` and ``threshold`` are in eps units.
Their code runs SD 1.4, an eps model, where the two coincide.

**SS** (:class:`SemanticSearch`, slot ``mitigation.embedding``). At x_T, the original prompt and then its
paraphrases in file order are tried; the first with ``||eps_c - eps_u||_2 <= l_target`` (``l_target_ss``) is used
(the original itself if it is already below: no trigger), and if none is, the one with the smallest magnitude,
the original included (``local_sd_pipeline.py`` l. 840-852, 886-949; their paraphrases: the ``caption1`` ..
``caption25`` fields of the dataset row, ``inference_mem.py`` l. 125).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from memguard.errors import UserError
from memguard.families import join
from memguard.mitigations import Branches, Conditions, Family, Info, Start

GATES = ("sample", "batch")
FORMATS = ("a .jsonl of rows {caption, caption1, caption2, ...}, a .json {prompt: [paraphrase, ...]} or a .csv "
           "with columns prompt, paraphrase (one row per paraphrase)")


class PromptReanchoring(Branches):
    """Prompt re-anchoring (PR), the :class:`~memguard.mitigations.Branches` of PRSS (formula: module docstring).

    ``target`` (``l_target_pr``, 3: ``README.md`` l. 75; ``inference_mem.py`` l. 242 defaults to None, PR off) and
    ``threshold`` (``mag_thres_pr``, 5: ``inference_mem.py`` l. 243, ``README.md`` l. 76) in eps units;
    ``p``: the norm of the gate (``lp=2``, ``local_sd_pipeline.py`` l. 93). ``trigger``: the first-step magnitude
    of the original prompt above which an image is re-anchored (None: every image), in the model's raw units, those
    of the embedding's ``l_target`` it defaults to.

    ``gate="sample"`` (default) measures ``r`` and the trigger per image. ``gate="batch"`` measures both over the
    whole batch tensor, as their ``(eps_c - eps_u).norm(p=lp)`` (l. 216) and their target losses (l. 691, 921) do
    over one prompt's ``num_images_per_prompt`` images: an image's result then depends on its batch (its size and
    its other images).

    Where the scale is ``g <= 1`` the step is plain CFG (their pipeline guides only for ``g > 1``, l. 126, and
    ``c`` divides by ``g - 1``). The original prompt's branch is evaluated at every step for every image (3 denoiser
    evaluations per step; their code makes 4 where triggered, the null prompt twice, and 2 elsewhere).
    Per image: ``prss_triggered`` (0/1) and ``prss_steps_reanchored`` (steps where the formula replaced CFG).
    """

    families = ("sd", "sdxl")

    def __init__(self, target: float = 3.0, threshold: float = 5.0, trigger: float | None = None,
                 gate: str = "sample", p: float = 2.0) -> None:
        if not 0 <= target < threshold:
            raise ValueError(f"target={target}, threshold={threshold}: need 0 <= target < threshold")
        if trigger is not None and trigger < 0:
            raise ValueError(f"trigger={trigger} must be >= 0, or null to re-anchor every image")
        if gate not in GATES:
            raise ValueError(f"gate={gate!r} must be one of {', '.join(GATES)}")
        if p <= 0:
            raise ValueError(f"p={p} must be > 0")
        self.target, self.threshold, self.trigger, self.gate, self.p = target, threshold, trigger, gate, p
        self._triggered: Tensor | None = None
        self._reanchored: Tensor | None = None

    def conditions(self, family: Family, prompts: Sequence[str], size: int | None) -> list[Conditions]:
        """The original prompts' conditions (a new batch: the trigger is measured again at its first step)."""
        self._triggered = self._reanchored = None
        return [family.encode(prompts, size)]

    def combine(self, eps_u: Tensor, eps_c: Tensor, extra: list[Tensor], scale: Tensor, step: int,
                a: float = 1.0) -> Tensor:
        """Per sample: the re-anchored prediction where triggered, ``g > 1`` and ``r > target``; else CFG.

        The outputs are combined as they are (the combination's weights sum to 1, so for a v-prediction model the
        combined v gives the combined eps); the gate reads ``a`` times the difference, eps units, as its
        thresholds are; the trigger the raw difference, as the embedding's target it is tied to."""
        (eps_o,) = extra
        if step == 0 or self._triggered is None:
            self._start(eps_u, eps_o)
        magnitude = self.magnitude(a * (eps_c - eps_u), self.p)
        g = scale.to(magnitude.dtype)
        fire = self._triggered & (g > 1) & (magnitude > self.target)
        self._reanchored += fire
        s_pr = self.s_pr(magnitude, torch.where(g > 1, g, 2.0))  # g <= 1: unused (c divides by g - 1)
        shape = (-1, *[1] * (eps_c.dim() - 1))
        g, s_pr = g.to(eps_c.dtype).view(shape), s_pr.to(eps_c.dtype).view(shape)
        anchored = eps_o + s_pr * (eps_c - eps_o) + (g - s_pr) * (eps_c - eps_u)
        return torch.where(fire.view(shape), anchored, eps_u + g * (eps_c - eps_u))

    @torch.no_grad()
    def calibration_scores(self, family: Family, start: Start, cond: Conditions, uncond: Conditions,
                           noise: Tensor) -> Tensor:
        """The gate's ``r = ||a (out_c - out_u)||_p`` per image at its own noise, the first step (eps units, as
        ``target`` and ``threshold``): what ``memguard calibrate mitigation=prss`` scores on control prompts."""
        x = start.model_input(noise * start.sigma).to(family.denoiser.dtype)
        out_u, out_c = family(torch.cat([x, x]), start.t, join(uncond, cond)).float().chunk(2)
        return self.magnitude(start.a * (out_c - out_u), self.p)

    def s_pr(self, magnitude: Tensor, g: Tensor) -> Tensor:
        """``min((r - c) / (m - c) g, g)`` with ``c = (g l - m) / (g - 1)``, per sample (``g > 1``)."""
        c = (g * self.target - self.threshold) / (g - 1)
        return torch.minimum((magnitude - c) / (self.threshold - c) * g, g)

    def magnitude(self, difference: Tensor, p: float) -> Tensor:
        """``||difference||_p`` per sample ``(B,)``, or (``gate="batch"``) of the whole batch, repeated; in float32
        or the outputs' own precision if higher."""
        difference = difference.to(torch.promote_types(difference.dtype, torch.float32))
        if self.gate == "batch":
            return difference.norm(p=p).expand(len(difference))
        return difference.flatten(1).norm(p=p, dim=1)

    def _start(self, eps_u: Tensor, eps_o: Tensor) -> None:
        """m_trigger from the first step: the original prompt's raw ``||out_o - out_u||_2`` above ``trigger``."""
        if self.trigger is None:
            self._triggered = torch.ones(len(eps_u), dtype=torch.bool, device=eps_u.device)
        else:
            self._triggered = self.magnitude(eps_o - eps_u, 2.0) > self.trigger
        self._reanchored = torch.zeros(len(eps_u), dtype=torch.long, device=eps_u.device)

    def info(self) -> Info:
        if self._triggered is None:
            return {}
        return {"prss_triggered": self._triggered.long(), "prss_steps_reanchored": self._reanchored.clone()}


class SemanticSearch:
    """Semantic search (SS), slot ``mitigation.embedding``: per image, the first of [original prompt, its
    paraphrases in file order] whose first-step ``||eps(x_T, p) - eps(x_T, null)||_2 <= l_target`` (``l_target_ss``,
    1: ``README.md`` l. 77), else the one with the smallest such magnitude; sampling then conditions on it. The
    search runs at the image's own x_T, so its choice derives from the image's seed alone.

    ``paraphrases``: a file, :data:`FORMATS` (their dataset rows, ``sdv1_500_mem_groundtruth_repeated_withss.jsonl``,
    read by ``optim_utils.py`` l. 86-88, are the jsonl shape; the one they ship has 4 rows of 25 paraphrases each).
    Every prompt of the run must be in it (an empty list: the original prompt is the only candidate).

    Per image: ``ss_choice`` (0: the original prompt, k: its k-th paraphrase), ``ss_first_norm`` (the original's
    magnitude), ``ss_final_norm`` (the chosen one's), ``ss_reached_target``, and ``unet_evals_before``: 1 null + 1
    per candidate tried (their code evaluates the null prompt again with each candidate).
    """

    families = ("sd", "sdxl")

    def __init__(self, paraphrases: str | None = None, l_target: float = 1.0) -> None:
        if l_target <= 0:
            raise ValueError(f"l_target={l_target} must be > 0")
        self.l_target, self.path, self.table = l_target, paraphrases, read_paraphrases(paraphrases)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """One line naming the key and the prompts the file lacks."""
        missing = sorted({p for p in prompts if p.strip() not in self.table})
        if missing:
            shown = ", ".join(repr(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise UserError(f"mitigation.embedding.paraphrases={self.path} has no paraphrases for {len(missing)} of "
                            f"{len(set(prompts))} prompts ({shown}); add a row for each (an empty list: none)")

    @torch.no_grad()
    def __call__(self, model: Family, x_in: Tensor, t: Tensor, cond: Conditions, uncond: Conditions,
                 prompts: Sequence[str] = (), **_: object) -> tuple[Conditions, Info]:
        """``model``: the family adapter (it encodes the paraphrases); ``x_in``: the first step's model input."""
        self.check_prompts(prompts)
        candidates = [self.table[p.strip()] for p in prompts]
        eps_u = model(x_in, t, uncond)

        def norm(rows: list[int], conditions: Conditions) -> Tensor:
            return (model(x_in[rows], t, conditions) - eps_u[rows]).float().flatten(1).norm(dim=1)

        everyone = list(range(len(prompts)))
        first = norm(everyone, cond)
        best, choice = first.clone(), torch.zeros_like(first, dtype=torch.long)
        chosen = {key: value.clone() for key, value in cond.items()}
        done, evals = first <= self.l_target, torch.full_like(choice, 2)
        side = x_in.shape[-1] * model.vae_scale_factor
        for k in range(1, 1 + max(map(len, candidates), default=0)):
            rows = [i for i in everyone if not done[i] and len(candidates[i]) >= k]
            if not rows:
                break
            encoded = model.encode([candidates[i][k - 1] for i in rows], side)
            magnitudes = norm(rows, encoded)
            for j, i in enumerate(rows):
                evals[i] += 1
                if magnitudes[j] < best[i]:  # the smallest so far (one below the target is: best is above it)
                    for key, value in chosen.items():
                        value[i] = encoded[key][j].to(value.dtype)
                    best[i], choice[i], done[i] = magnitudes[j], k, magnitudes[j] <= self.l_target
        info = {"ss_choice": choice, "ss_first_norm": first, "ss_final_norm": best,
                "ss_reached_target": best <= self.l_target, "unet_evals_before": evals}
        return chosen, info


# ---------------------------------------------------------------------------------------------------------------
# The paraphrase file


def read_paraphrases(path: str | None) -> dict[str, list[str]]:
    """``{prompt: [paraphrase, ...]}`` from a .jsonl, .json or .csv file (:data:`FORMATS`); prompts stripped."""
    if path is None:
        raise ValueError(f"paraphrases=None: give mitigation.embedding.paraphrases=PATH, {FORMATS}")
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ValueError(f"paraphrases={path}: no such file; give {FORMATS}")
    readers: dict[str, Callable[[Path], list[tuple[str, list[str]]]]] = {
        ".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    if file.suffix not in readers:
        raise ValueError(f"paraphrases={path}: unknown file type {file.suffix!r}; give {FORMATS}")
    try:
        rows = readers[file.suffix](file)
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"paraphrases={path} cannot be read ({err}); give {FORMATS}") from None
    table: dict[str, list[str]] = {}
    for prompt, texts in rows:
        prompt = prompt.strip()
        if prompt in table and table[prompt] != texts:
            raise ValueError(f"paraphrases={path} lists {prompt!r} twice with different paraphrases; keep one")
        table[prompt] = texts
    return table


def _jsonl_rows(file: Path) -> list[tuple[str, list[str]]]:
    """Their dataset rows: ``caption`` (the prompt) and ``caption1``, ``caption2``, ... in numeric order."""
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "caption" not in row:
            raise KeyError(f"line {number} has no 'caption'")
        keys = sorted((int(m.group(1)), k) for k in row if (m := re.fullmatch(r"caption(\d+)", k)))
        rows.append((str(row["caption"]), [str(row[k]) for _, k in keys]))
    return rows


def _json_rows(file: Path) -> list[tuple[str, list[str]]]:
    """``{prompt: [paraphrase, ...]}`` or ``{prompt: paraphrase}``."""
    mapping = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise TypeError("the file is not a JSON object {prompt: [paraphrase, ...]}")
    return [(prompt, [texts] if isinstance(texts, str) else [str(t) for t in texts])
            for prompt, texts in mapping.items()]


def _csv_rows(file: Path) -> list[tuple[str, list[str]]]:
    """Columns ``prompt``, ``paraphrase``; a prompt's rows in file order (an empty paraphrase: none)."""
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"prompt", "paraphrase"} <= set(reader.fieldnames or ()):
            raise KeyError("the header must have the columns prompt, paraphrase")
        grouped: dict[str, list[str]] = {}
        for row in reader:
            grouped.setdefault(row["prompt"], []).extend([row["paraphrase"]] if row["paraphrase"] else [])
    return list(grouped.items())
