"""A procedural captioned image dataset, generated deterministically from a seed, for the tiny scenario.

Each image is one shape (circle, square, triangle, cross) of one colour at a random position and size on a
coloured background with a random low-frequency wave pattern (two plane waves: what makes one image
distinguishable from another with the same attributes) and grain. Its caption names the three attributes:
``"a red circle on a grey background"``. Many images share a caption (position, size and background texture
vary), so an ordinary caption is not tied to one image. The dataset has three kinds of sample:

- ``unique``: drawn once, under an ordinary caption;
- ``trigger``: one image repeated ``repeats`` times under its ordinary caption plus a made-up trigger word
  (``"... background, zorvex"``), the way a memorized training caption names one image;
- ``shared``: one image repeated ``repeats`` times under an ordinary caption that unique images also carry.

It is written like a real dataset: ``images/{i:05d}.png`` once per distinct image, and ``metadata.jsonl``
(one row per distinct image: ``file_name``, ``text``, ``kind``, ``repeats``, ``shape``, ``colour``,
``background``) in the layout of the Hugging Face ``imagefolder`` loader; ``prompts.jsonl`` holds the
evaluation prompts (``prompt``, ``group``).

``design="tiny2"`` (the second miniature) keeps that composition (shape, colour, position, size, background and
its waves) but names none of it: its caption names a fine texture laid over the whole image, a 4-pixel-period
``pattern`` (stripes, bars, checks, dots) in an ``ink`` colour, ``"a picture with red stripes"``. The texture is
zero-mean (it changes no pixel average over a period), so what the caption names lives at high spatial
frequency, which a diffusion model decides late, and what makes a duplicated image *that* image (where the shape
is, its colour, the background) lives at low frequency, decided early: the order the paper's transition point
needs (CFG applied after the exit from the basin still sets what the caption names; Jain et al., Fig. 4).
Its rows also record ``pattern`` and ``ink``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from memguard.errors import UserError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95),
           "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.15, 0.85), "cyan": (0.1, 0.85, 0.9)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "grey": (0.5, 0.5, 0.5),
               "brown": (0.45, 0.28, 0.12)}
WAVE_AMPLITUDE = 0.15
TRIGGER_WORDS = ("zorvex", "quillbat", "fenwhistle", "marblin", "dravoni", "plumtok", "sketterly", "vombrel")
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
# design tiny2: the texture its caption names. INKS are offsets from mid-grey; none is another's negative, so a
# pattern's sign (its phase) cannot turn one ink into another.
PATTERNS = ("stripes", "bars", "checks", "dots")
INKS = {"red": (0.4, -0.4, -0.4), "green": (-0.4, 0.35, -0.4), "blue": (-0.35, -0.25, 0.45), "white": (0.4, 0.4, 0.4)}
PERIOD = 4  # pixels
TEXTURE_AMPLITUDE = 0.5
DESIGNS = {"tiny": ATTRIBUTES, "tiny2": {"pattern": PATTERNS, "ink": tuple(INKS)}}


@dataclass(frozen=True)
class Sample:
    """One distinct image's description; ``render`` draws it."""

    shape: str
    colour: str
    background: str
    cx: float  # centre, in pixels
    cy: float
    radius: float
    waves: tuple[tuple[float, float, float], ...]  # background plane waves: (cycles along x, along y, phase)
    grain_seed: int
    pattern: str | None = None  # design tiny2: the named texture, its ink and its offset in pixels (x, y)
    ink: str | None = None
    offset: tuple[int, int] = (0, 0)
    amplitude: float = TEXTURE_AMPLITUDE  # the texture's amplitude in the image

    @property
    def caption(self) -> str:
        if self.pattern is not None:
            return f"a picture with {self.ink} {self.pattern}"
        return f"a {self.colour} {self.shape} on a {self.background} background"


def _check_design(design: str) -> None:
    if design not in DESIGNS:
        raise ValueError(f"design={design!r} is not one of {tuple(DESIGNS)}")


def random_sample(rng: np.random.Generator, size: int, design: str = "tiny",
                  texture_amplitude: float = TEXTURE_AMPLITUDE) -> Sample:
    """A random sample; ``design="tiny2"`` draws its texture after the composition, from the same stream, and
    draws it with ``texture_amplitude`` (larger: the texture is decided earlier in sampling)."""
    _check_design(design)
    sample = Sample(
        shape=SHAPES[rng.integers(len(SHAPES))], colour=tuple(COLOURS)[rng.integers(len(COLOURS))],
        background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=float(rng.uniform(0.3, 0.7) * size), cy=float(rng.uniform(0.3, 0.7) * size),
        radius=float(rng.uniform(0.17, 0.3) * size),
        waves=tuple((float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.5, 1.5)), float(rng.uniform(0, 2 * np.pi)))
                    for _ in range(2)),
        grain_seed=int(rng.integers(2**31)),
    )
    if design == "tiny2":
        sample = replace(sample, pattern=PATTERNS[rng.integers(len(PATTERNS))], ink=tuple(INKS)[rng.integers(len(INKS))],
                         offset=(int(rng.integers(PERIOD)), int(rng.integers(PERIOD))),
                         amplitude=float(texture_amplitude))
    return sample


def _mask(sample: Sample, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage of the shape, ``(size, size)`` in [0, 1]."""
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / supersample
    dx, dy, r = x - sample.cx, y - sample.cy, sample.radius
    if sample.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif sample.shape == "square":
        inside = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    elif sample.shape == "triangle":  # apex up, base at cy + r/2
        inside = (dy <= 0.5 * r) & (np.abs(dx) <= (dy + r) / np.sqrt(3))
    elif sample.shape == "cross":
        arm = 0.33 * r
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"shape={sample.shape!r} is not one of {SHAPES}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def texture(pattern: str, size: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The zero-mean texture ``m = p - mean(p)``, ``(size, size)``, of a binary pattern ``p`` with period
    ``PERIOD`` pixels shifted by ``offset``: ``stripes`` (rows), ``bars`` (columns), ``checks`` (2-pixel
    squares), ``dots`` (2x2 dots, one per period). Its mean over whole periods is 0."""
    y, x = np.mgrid[0:size, 0:size]
    x, y, half = (x + offset[0]) % PERIOD, (y + offset[1]) % PERIOD, PERIOD // 2
    if pattern == "stripes":
        p = y < half
    elif pattern == "bars":
        p = x < half
    elif pattern == "checks":
        p = (x < half) == (y < half)
    elif pattern == "dots":
        p = (x < half) & (y < half)
    else:
        raise ValueError(f"pattern={pattern!r} is not one of {PATTERNS}")
    coverage = {"dots": 0.25}.get(pattern, 0.5)
    return p.astype(float) - coverage


def render(sample: Sample, size: int = 16) -> np.ndarray:
    """The image as ``uint8 (size, size, 3)``: background with two waves (amplitude ``WAVE_AMPLITUDE`` each) and
    grain, then the shape; for a tiny2 sample, plus ``amplitude * texture * ink`` over the whole image.
    Background colours are pulled in from 0 and 1 far enough for the waves to show."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    wave = sum(np.cos(2 * np.pi * (fx * x + fy * y) + phase) for fx, fy, phase in sample.waves) * WAVE_AMPLITUDE
    grain = np.random.default_rng(sample.grain_seed).normal(0, 0.03, (size, size, 1))
    base = np.asarray(BACKGROUNDS[sample.background])
    centre = np.clip(base, 2 * WAVE_AMPLITUDE, 1 - 2 * WAVE_AMPLITUDE)  # keep the waves inside [0, 1]
    background = centre + wave[..., None] + grain
    alpha = _mask(sample, size)[..., None]
    image = alpha * np.asarray(COLOURS[sample.colour]) + (1 - alpha) * background
    if sample.pattern is not None:
        image = image + sample.amplitude * texture(sample.pattern, size, sample.offset)[..., None] * np.asarray(
            INKS[sample.ink])
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@dataclass(frozen=True)
class Row:
    """A ``metadata.jsonl`` row: one distinct image and how often it occurs in training."""

    file_name: str
    text: str
    kind: str  # unique | trigger | shared
    repeats: int
    shape: str
    colour: str
    background: str
    pattern: str | None = None  # design tiny2 only
    ink: str | None = None

    def record(self) -> dict:
        """The row as written to ``metadata.jsonl`` (tiny rows without the tiny2 fields, as before them)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def build_rows(seed: int, size: int, n_unique: int, n_trigger: int, n_shared: int, repeats: int,
               caption_noise: float = 0.0, design: str = "tiny",
               texture_amplitude: float = TEXTURE_AMPLITUDE) -> tuple[list[Row], list[Sample]]:
    """Draw the samples; trigger and shared images come first, so they are easy to find. With ``caption_noise``
    that fraction of the unique images carry the caption of attributes drawn at random (as many web captions do
    not describe their image; the row's ``shape``, ``colour`` and ``background`` stay the image's own); the
    duplicated images always carry theirs. The draw has its own stream, so the images do not change with it.
    ``design`` picks the generator and the attributes a caption names (``DESIGNS``); ``texture_amplitude`` is
    design tiny2's."""
    if n_trigger > len(TRIGGER_WORDS):
        raise ValueError(f"n_trigger={n_trigger} exceeds the {len(TRIGGER_WORDS)} trigger words")
    rng = np.random.default_rng(seed)
    samples = [random_sample(rng, size, design, texture_amplitude) for _ in range(n_trigger + n_shared + n_unique)]
    noise = np.random.default_rng([seed, 1])
    rows = []
    for i, s in enumerate(samples):
        if i < n_trigger:
            kind, text, count = "trigger", f"{s.caption}, {TRIGGER_WORDS[i]}", repeats
        elif i < n_trigger + n_shared:
            kind, text, count = "shared", s.caption, repeats
        else:
            kind, text, count = "unique", s.caption, 1
            if caption_noise > 0 and noise.random() < caption_noise:
                text = replace(s, **{k: names[noise.integers(len(names))] for k, names in DESIGNS[design].items()}
                               ).caption
        rows.append(Row(f"images/{i:05d}.png", text, kind, count, s.shape, s.colour, s.background, s.pattern, s.ink))
    return rows, samples


def evaluation_prompts(rows: list[Row], n_unique: int = 8) -> list[dict[str, str]]:
    """Every trigger and shared caption, and ``n_unique`` ordinary captions that no duplicated image carries."""
    prompts = [{"prompt": r.text, "group": r.kind} for r in rows if r.kind != "unique"]
    duplicated = {r.text for r in rows if r.kind != "unique"}
    unique = sorted({r.text for r in rows if r.kind == "unique"} - duplicated)
    picks = np.random.default_rng(0).choice(len(unique), size=min(n_unique, len(unique)), replace=False)
    return prompts + [{"prompt": unique[i], "group": "unique"} for i in sorted(picks)]


def write_dataset(folder: str | Path, seed: int = 0, size: int = 16, n_unique: int = 2400, n_trigger: int = 4,
                  n_shared: int = 2, repeats: int = 100, n_eval_unique: int = 8, caption_noise: float = 0.0,
                  design: str = "tiny", texture_amplitude: float = TEXTURE_AMPLITUDE) -> Path:
    """Write ``images/``, ``metadata.jsonl`` and ``prompts.jsonl`` into ``folder`` (which must not hold a dataset)."""

    root = Path(folder)
    if (root / "metadata.jsonl").exists():
        raise FileExistsError(f"{root} already holds a dataset (metadata.jsonl); choose an empty folder")
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, samples = build_rows(seed, size, n_unique, n_trigger, n_shared, repeats, caption_noise, design,
                               texture_amplitude)
    for row, s in zip(rows, samples):
        Image.fromarray(render(s, size)).save(root / row.file_name)
    _write_jsonl(root / "prompts.jsonl", evaluation_prompts(rows, n_eval_unique))
    _write_jsonl(root / "metadata.jsonl", [r.record() for r in rows])
    return root


def random_images(n: int, seed: int, size: int = 16, design: str = "tiny",
                  texture_amplitude: float = TEXTURE_AMPLITUDE) -> tuple[np.ndarray, list[Sample]]:
    """``n`` fresh procedural images ``uint8 (n, size, size, 3)`` with their samples (never in a training set
    drawn with another seed): for calibrating thresholds and training the alignment classifier."""
    rng = np.random.default_rng(seed)
    samples = [random_sample(rng, size, design, texture_amplitude) for _ in range(n)]
    return np.stack([render(s, size) for s in samples]), samples


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line, e.g. an imagefolder ``metadata.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metadata(folder: str | Path) -> list[Row]:
    return [Row(**row) for row in read_jsonl(Path(folder) / "metadata.jsonl")]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def dataset_digest(folder: str | Path) -> str:
    """SHA-256 of ``metadata.jsonl`` and of every listed image's decoded pixels (not its PNG bytes, which
    depend on the encoder), in order: what a model trained on the dataset was trained on."""

    root = Path(folder)
    digest = hashlib.sha256((root / "metadata.jsonl").read_bytes())
    for row in read_metadata(root):
        digest.update(np.asarray(Image.open(root / row.file_name).convert("RGB")).tobytes())
    return digest.hexdigest()


CHECKED = ".memguard_digest.json"  # in the dataset folder: the digest last verified, and the files' state then


def files_state(folder: str | Path) -> str:
    """SHA-256 of the name, size and modification time of ``metadata.jsonl`` and of every listed image: it changes
    when any of them is written again, as a digest check must then be repeated."""
    root = Path(folder)
    state = hashlib.sha256()
    for name in ["metadata.jsonl", *(row.file_name for row in read_metadata(root))]:
        stat = (root / name).stat()
        state.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return state.hexdigest()


def ensure_dataset(folder: str | Path, digest: str | None = None, **spec: float) -> Path:
    """Write the dataset described by ``spec`` (:func:`write_dataset`'s arguments) into ``folder`` unless it is
    there, then check it is the one ``digest`` names (the one the model was trained on). The pixels are hashed
    once: the check is recorded in ``folder/.memguard_digest.json`` with the files' state (:func:`files_state`),
    and repeated only when a file has changed since."""
    root = Path(folder)
    if not (root / "metadata.jsonl").exists():
        write_dataset(root, **spec)
    if digest is None:
        return root
    checked = root / CHECKED
    state = files_state(root)
    if checked.is_file() and json.loads(checked.read_text()) == {"digest": digest, "files": state}:
        return root
    if (found := dataset_digest(root)) != digest:
        raise UserError(f"dataset.folder={str(folder)!r} is not the dataset this model was trained on (digest "
                        f"{found[:12]} != {digest[:12]}); delete the folder to regenerate it, or point "
                        "dataset.folder elsewhere")
    checked.write_text(json.dumps({"digest": digest, "files": state}) + "\n")
    return root
