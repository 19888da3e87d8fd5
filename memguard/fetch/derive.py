"""``kind: derived``: an input that comes with another source (``from``: that source's name), written from what it
fetched where ``make`` says how, else only looked for in it. ``memguard fetch`` handles these after every other
source. The makers read the authors' own layouts:

- ``captions_json``: DCR's ``*combined_captions.json`` ({image path: [caption, ...]}, beside the ``train/``
  folder of images: somepago/DCR diff_retrieval.py l. 66-68, 93-96 at commit 6c03709), read as Jain et al.'s
  generate_test_dataset_stp.py does (l. 145-151 at commit c6e813c: the first caption of each entry, in the file's
  order) into ``metadata.jsonl`` lines ``{"file_name", "text"}``; ``file_name`` is the image the entry names,
  found under the folder by its path's trailing parts (null where none is there: the caption is kept, so that
  ``prompt_draw`` draws from the same list as the authors);
- ``captions_txt``: one caption per ``.txt`` file beside the images (Wen et al.'s memorized images, read by
  Jain et al.'s generate_test_dataset_dtp.py l. 144-153: ``glob("memorized_images/*.txt")``, sorted, each file's
  text) into a JSONL file of ``{"caption", "file_name"}`` lines;
- ``coco_captions``: COCO's ``captions_val2017.json``, drawn as MemBench draws its general prompts
  (chunsanHong/MemBench_code ``run_mitigation.py`` l. 90-92 at commit f22a0fd:
  ``pd.DataFrame(json.load(f)['annotations']).drop_duplicates(subset='image_id')``: the first caption of each
  image, in the file's order, 5000 captions for the 5000 validation images) into a JSONL file of
  ``{"caption", "image_id", "id"}`` lines, the caption as written (their prompt, unstripped).
"""

from __future__ import annotations

import json
from pathlib import Path

from memguard.errors import UserError
from memguard.runs.folder import atomic_write_text

IMAGES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAKERS = ("captions_json", "captions_txt", "coco_captions")


def captions_json(folder: Path, out: Path) -> int:
    """DCR's captions JSON under ``folder`` -> ``out`` (metadata.jsonl); the number of captions."""
    found = sorted(folder.rglob("*combined_captions.json"))
    if not found:
        raise UserError(f"no *combined_captions.json under {folder} (DCR's captions file, beside train/); the fetched "
                        "folder holds something else")
    entries = json.loads(found[0].read_text(encoding="utf-8"))
    if not isinstance(entries, dict):
        raise UserError(f"{found[0]} is not a mapping of image path to captions (DCR's layout)")
    images: dict[str, list[Path]] = {}
    for p in folder.rglob("*"):
        if p.suffix.lower() in IMAGES and p.is_file():
            images.setdefault(p.name, []).append(p)
    lines = []
    for key, captions in entries.items():
        text = captions[0] if isinstance(captions, list) else captions
        lines.append(json.dumps({"file_name": _match(str(key), images, out.parent), "text": str(text)},
                                ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines)


def _match(key: str, images: dict[str, list[Path]], base: Path) -> str | None:
    """The image whose path ends with the most of ``key``'s parts, relative to ``base``."""
    parts = Path(key.replace("\\", "/")).parts
    candidates = images.get(parts[-1] if parts else "", [])
    if not candidates:
        return None

    def shared(p: Path) -> int:
        n = 0
        for a, b in zip(reversed(p.parts), reversed(parts)):
            if a != b:
                break
            n += 1
        return n

    best = max(candidates, key=shared)
    try:
        return best.relative_to(base).as_posix()
    except ValueError:
        return str(best)


def captions_txt(folder: Path, out: Path) -> int:
    """One caption per ``.txt`` under ``folder`` (sorted by path) -> ``out`` (JSONL); the number of captions."""
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise UserError(f"no .txt caption files under {folder} (one beside each memorized image); the fetched folder "
                        "holds something else")
    lines = []
    for f in files:
        image = next((f.with_suffix(s) for s in IMAGES if f.with_suffix(s).is_file()), None)
        lines.append(json.dumps({"caption": f.read_text(encoding="utf-8"),
                                 "file_name": image.relative_to(out.parent).as_posix() if image is not None
                                 and image.is_relative_to(out.parent) else None}, ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines)


def coco_captions(folder: Path, out: Path) -> int:
    """COCO's ``captions_val2017.json`` under ``folder`` -> ``out`` (JSONL), the first caption per image id in the
    file's order; the number of captions."""
    found = sorted(folder.rglob("captions_val2017.json"))
    if not found:
        raise UserError(f"no captions_val2017.json under {folder} (COCO 2017's caption annotations); the fetched "
                        "folder holds something else")
    data = json.loads(found[0].read_text(encoding="utf-8"))
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all({"image_id", "id", "caption"} <= set(a) for a in annotations):
        raise UserError(f"{found[0]} has no list of annotations with image_id, id and caption (COCO's caption layout)")
    seen: set[int] = set()
    lines = []
    for a in annotations:
        if a["image_id"] not in seen:
            seen.add(a["image_id"])
            lines.append(json.dumps({"caption": a["caption"], "image_id": a["image_id"], "id": a["id"]},
                                    ensure_ascii=False))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return len(lines)


def make(how: str | None, key: str, folder: Path, dest: Path) -> str:
    """Write ``dest`` from ``folder`` (what the ``from`` source fetched), or check that it is there; a line."""
    if how is None:
        if not dest.exists():
            raise UserError(f"sources.{key}: {dest} is not in what was fetched into {folder}; the fetched folder "
                            "holds something else")
        return f"{key}: {dest} (came with {folder})"
    if how not in MAKERS:
        raise UserError(f"sources.{key}.make={how!r} is not a maker; use one of {', '.join(MAKERS)} or null")
    if not folder.is_dir():
        raise UserError(f"sources.{key}: {folder}, which it is written from, is not there; fetch that source first")
    n = {"captions_json": captions_json, "captions_txt": captions_txt, "coco_captions": coco_captions}[how](folder, dest)
    return f"{key}: {n} caption(s) from {folder} -> {dest}"
