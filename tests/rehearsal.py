"""Rehearsal data: each paper scenario's inputs in their real layout and with their real awkwardness, made
here from nothing (no download), small enough for CI.

- LAION-10k / LAION-100k (Somepalli et al.): ``metadata.jsonl`` (``file_name``, ``text``) and ``images/`` of
  JPEG, PNG, WebP and BMP files of different sizes and modes (RGB, grayscale, palette, RGBA, CMYK, 16-bit
  grayscale PNG, a JPEG whose EXIF orientation rotates it);
- Imagenette: ``imagenette2/train/<wnid>/*.JPEG``, among them a grayscale and a CMYK JPEG (ImageNet has both);
- Wen et al.'s dup200: ``prompts.jsonl`` (``caption``) and ``images/*.jpg`` with a ``.txt`` caption beside each;
- Webster's 500 (Wen et al.'s ``sdv1_500_memorized.jsonl``: ``caption``, ``index``, ``url``) with captions
  holding HTML tags, doubled quotes, non-ASCII text, one duplicate and one longer than 77 CLIP tokens, and
  ``gt_images/{index}/`` folders of one to three images each.

Also the stand-ins for the paper's metric weights, built as the tests already build them: a TorchScript module
in place of SSCD, a tiny open_clip model's state dict, a random FID InceptionV3 state dict with the real keys.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
LONG_CAPTION = " ".join(["a very detailed matte painting of a castle on a hill at sunset"] * 8)
WEBSTER_CAPTIONS = [  # (index, caption)
    (0, "<i>The Great Gatsby</i> book cover, first edition"),
    (11, '""Mona Lisa"" by Leonardo da Vinci, oil on poplar'),
    (23, "Café de Flore – Paris, 東京 poster"),
    (37, "<i>The Great Gatsby</i> book cover, first edition"),  # the same caption under another index
    (42, LONG_CAPTION),
]
IMAGENETTE_WNIDS = ("n01440764", "n02102040")


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random RGB picture (not flat: so similarity has something to see)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def _exif_rotated_jpeg(array: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise), as cameras write."""
    image = Image.fromarray(np.rot90(array, k=1).copy())
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


def write_awkward_image(path: Path, kind: str, width: int, height: int, seed: int) -> None:
    """One image file of the given kind: rgb_jpeg, rgb_png, gray_jpeg, palette_png, rgba_png, cmyk_jpeg,
    gray16_png, webp, bmp, exif_jpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = _pattern(width, height, seed)
    image = Image.fromarray(rgb)
    if kind == "rgb_jpeg":
        image.save(path, format="JPEG", quality=95)
    elif kind == "rgb_png":
        image.save(path, format="PNG")
    elif kind == "gray_jpeg":
        image.convert("L").save(path, format="JPEG", quality=95)
    elif kind == "palette_png":
        image.convert("P", palette=Image.ADAPTIVE, colors=16).save(path, format="PNG")
    elif kind == "rgba_png":
        alpha = np.full((height, width), 255, np.uint8)
        alpha[: height // 3] = 0  # the top third transparent
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path, format="PNG")
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "gray16_png":
        gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(gray).save(path, format="PNG")  # mode I;16
    elif kind == "webp":
        image.save(path, format="WEBP", quality=90)
    elif kind == "bmp":
        image.save(path, format="BMP")
    elif kind == "exif_jpeg":
        path.write_bytes(_exif_rotated_jpeg(rgb))
    else:
        raise ValueError(kind)


LAION_FILES = [  # (file, kind, width, height)
    ("000000001.jpg", "rgb_jpeg", 500, 375),
    ("000000002.png", "rgb_png", 640, 480),
    ("000000003.jpg", "gray_jpeg", 96, 128),
    ("000000004.png", "palette_png", 120, 90),
    ("000000005.png", "rgba_png", 80, 80),
    ("000000006.jpg", "cmyk_jpeg", 150, 100),
    ("000000007.png", "gray16_png", 64, 96),
    ("000000008.webp", "webp", 110, 70),
    ("000000009.bmp", "bmp", 72, 54),
    ("000000010.jpg", "exif_jpeg", 160, 120),
]
SUFFIX = {"rgb_jpeg": "jpg", "gray_jpeg": "jpg", "cmyk_jpeg": "jpg", "exif_jpeg": "jpg", "rgb_png": "png",
          "palette_png": "png", "rgba_png": "png", "gray16_png": "png", "webp": "webp", "bmp": "bmp"}


def write_laion(root: Path, name: str) -> None:
    data = root / name
    rows = []
    for i, (file, kind, w, h) in enumerate(LAION_FILES):
        write_awkward_image(data / "images" / file, kind, w, h, seed=i)
        rows.append({"file_name": f"images/{file}", "text": f"photo {i} of a \"quoted\" thing – {kind}"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")


def write_imagenette(root: Path) -> None:
    kinds = ["rgb_jpeg", "gray_jpeg", "cmyk_jpeg"]
    for w, wnid in enumerate(IMAGENETTE_WNIDS):
        for j, kind in enumerate(kinds):
            write_awkward_image(root / "imagenette2" / "train" / wnid / f"{wnid}_{1000 + j}.JPEG", kind,
                                160 + 40 * j, 120 + 10 * w, seed=10 * w + j)


def write_wen_dup200(root: Path, n: int = 3) -> None:
    data = root / "wen_dup200"
    captions = [f"memorized photo {i}, “curly quotes” and a trailing space " for i in range(n)]
    for i, caption in enumerate(captions):
        write_awkward_image(data / "images" / f"{i:08d}.jpg", "rgb_jpeg", 512 - 37 * i, 512, seed=100 + i)
        (data / "images" / f"{i:08d}.txt").write_text(caption, encoding="utf-8")
    (data / "prompts.jsonl").write_text("".join(json.dumps({"caption": c}, ensure_ascii=False) + "\n" for c in captions),
                                        encoding="utf-8")


def write_webster500(root: Path) -> None:
    data = root / "webster500"
    data.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"caption": c, "index": i, "url": f"https://example.invalid/{i}.jpg"}, ensure_ascii=False)
             for i, c in WEBSTER_CAPTIONS]
    (data / "sdv1_500_memorized.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    kinds = ["rgb_png", "rgb_jpeg", "rgba_png"]
    for n, (index, _) in enumerate(WEBSTER_CAPTIONS):
        for j in range(1 + n % 3):  # one to three ground-truth images per prompt
            kind = kinds[j]
            write_awkward_image(data / "gt_images" / str(index) / f"{j}.{SUFFIX[kind]}", kind, 512 + 64 * j,
                                512 - 32 * n, seed=200 + 10 * n + j)


def write_rehearsal_data(root: Path) -> Path:
    """Every paper scenario's data under ``root`` (use as ``paths.data_dir``)."""
    write_laion(root, "laion10k")
    write_laion(root, "laion100k")
    write_imagenette(root)
    write_wen_dup200(root)
    write_webster500(root)
    return root


class PooledDescriptor(torch.nn.Module):
    """An SSCD stand-in: 4x4 average-pooled pixels through a fixed random projection (48 -> 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(48, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def write_metric_weights(folder: Path) -> dict[str, Path]:
    """The three stand-in weight files and the tiny open_clip config: keys sscd, clip, clip_config, inception."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    files = {"sscd": folder / "sscd_stand_in.torchscript.pt", "clip": folder / "tiny_clip.bin",
             "clip_config": folder / "mg-tiny-clip.json", "inception": folder / "inception_random.pth"}
    torch.jit.save(torch.jit.script(PooledDescriptor()), str(files["sscd"]))
    files["clip_config"].write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(files["clip_config"])
    torch.save(open_clip.create_model("mg-tiny-clip").state_dict(), files["clip"])
    write_random_inception(files["inception"])
    return files


def write_random_inception(path: Path) -> Path:
    """A randomly initialised FID InceptionV3 state dict with the real network's keys and shapes."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    original = module.FeatureExtractorInceptionV3.load_state_dict
    module.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    module.load_state_dict_from_url = lambda *a, **k: {}  # never download
    try:
        net = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        module.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(net.state_dict(), path)
    return path


def paper_metric_overrides(files: dict[str, Path]) -> list[str]:
    """``metrics=paper`` with its three networks replaced by the stand-ins (same code paths, no download)."""
    return ["metrics=paper", "device=cpu", f"metrics.similarity.path={files['sscd']}",
            "metrics.alignment.model=mg-tiny-clip", f"metrics.alignment.path={files['clip']}",
            f"+metrics.alignment.model_config={files['clip_config']}", f"metrics.fid.path={files['inception']}"]


AESTHETIC_HEAD = Path(__file__).parent / "fixtures" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
# A tiny open_clip model whose image embedding has ViT-L/14's 768 dimensions, so that the real aesthetic head reads it.
TINY_CLIP_768 = {**TINY_CLIP, "embed_dim": 768}


def write_extra_metric_weights(folder: Path) -> dict[str, Path]:
    """Stand-ins in the real formats for metrics=paper_plus's three extra metrics: ``aesthetic`` (the real MLP
    head, MemBench's file), ``aesthetic_clip`` + ``aesthetic_clip_config`` (a tiny open_clip model, 768-d
    embeddings), ``alexnet`` (a random torchvision AlexNet ``features.*`` state dict) and ``dino`` (a tiny
    transformers DINOv2 folder, written with save_pretrained)."""
    import open_clip
    import torchvision
    from transformers import Dinov2Config, Dinov2Model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    files = {"aesthetic": AESTHETIC_HEAD, "aesthetic_clip": folder / "tiny_clip_768.bin",
             "aesthetic_clip_config": folder / "mg-tiny-clip-768.json", "alexnet": folder / "alexnet_random.pth",
             "dino": folder / "dinov2-tiny"}
    files["aesthetic_clip_config"].write_text(json.dumps(TINY_CLIP_768))
    open_clip.add_model_config(files["aesthetic_clip_config"])
    torch.save(open_clip.create_model("mg-tiny-clip-768").state_dict(), files["aesthetic_clip"])
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, files["alexnet"])
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=14)).save_pretrained(files["dino"])
    return files


def extra_metric_overrides(files: dict[str, Path]) -> list[str]:
    """``+extra_metrics=[aesthetic,diversity,dino]`` with the stand-ins of :func:`write_extra_metric_weights`."""
    return ["+extra_metrics=[aesthetic,diversity,dino]", f"metrics.aesthetic.path={files['aesthetic']}",
            "metrics.aesthetic.clip_model=mg-tiny-clip-768", f"metrics.aesthetic.clip_path={files['aesthetic_clip']}",
            f"+metrics.aesthetic.model_config={files['aesthetic_clip_config']}",
            f"metrics.diversity.path={files['alexnet']}", f"metrics.dino.path={files['dino']}"]
