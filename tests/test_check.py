"""memguard check: every missing or wrong input in one error before anything is made; damaged run folders."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from memguard.check import check, check_inputs
from memguard.errors import UserError
from memguard.runner import run
from tests.rehearsal import write_metric_weights, write_webster500
from tests.test_cli import memguard_here as memguard
from tests.test_configs import compose_config

EMPTY_MACHINE = ["model.path='models/stable-diffusion-v1-4' is not a folder", "prompts_file='data/webster500/sdv1_500_memorized.jsonl'",
                 "references='data/webster500/gt_images'", "metrics.similarity.path='weights/sscd_disc_large",
                 "metrics.alignment.path='weights/ViT-g-14.bin'",
                 "metrics.fid.path='weights/weights-inception-2015-12-05-6726825d.pth'"]


def _assert_lists_every_input(message: str) -> None:
    assert message.count("\n  - ") == 6, message
    for expected in EMPTY_MACHINE:
        assert expected in message, expected
    assert "gt_images" in message and "drive.google.com" in message  # where the ground truth comes from
    assert message.count("`memguard fetch`") == 6  # and that memguard fetch gets each


def test_check_lists_every_missing_input_of_webster500_at_once(tmp_path: Path) -> None:
    result = memguard("check", "scenario=webster500", "metrics=paper", "sources.model.mirrors=[{repo: a/b}]",
                      cwd=tmp_path)  # a field the source node lacks: set without Hydra's `+`
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("memguard: error: 6 input(s) missing or wrong")
    _assert_lists_every_input(result.stderr)
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.rglob(".hydra"))  # no run folder, no log
    assert not list(tmp_path.rglob("*.log"))


def test_run_reports_them_before_making_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["scenario=webster500", "metrics=paper"])
    with pytest.raises(UserError) as err:
        run(cfg)
    _assert_lists_every_input(str(err.value))
    assert not (tmp_path / "outputs").exists()  # no run folder, no image


def test_check_passes_on_good_inputs_and_warns(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    write_webster500(tmp_path / "data")
    weights = write_metric_weights(tmp_path / "weights")
    cfg = compose_config(["scenario=webster500", f"model.path={tiny_model_dir}", f"paths.data_dir={tmp_path / 'data'}",
                          "metrics=paper", f"metrics.similarity.path={weights['sscd']}",
                          f"metrics.alignment.path={weights['clip']}", f"metrics.fid.path={weights['inception']}",
                          f"paths.output_dir={tmp_path / 'out'}"])
    report = check_inputs(cfg)
    assert report.problems == []
    assert any("1 duplicate prompt" in w for w in report.warnings), report.warnings
    assert any("longer than 77 CLIP tokens" in w and "prompt 4" in w for w in report.warnings), report.warnings
    assert "references: 9 images" in " ".join(report.notes)
    check(cfg)  # the summary agrees with the warnings above it
    out = capsys.readouterr().out
    assert f"with {len(report.warnings)} warning(s) above" in out.splitlines()[-1] and "every input" not in out

    gt = tmp_path / "data" / "webster500" / "gt_images"
    (gt / "11" / "0.png").write_bytes(b"not an image")
    (gt / "23" / "2.png").write_bytes(b"")
    for f in (gt / "37").iterdir():
        f.unlink()
    (tmp_path / "weights" / "tiny_clip.bin").write_bytes(b"truncated")
    (tiny_model_dir.parent / "broken").mkdir(exist_ok=True)
    report = check_inputs(compose_config([*cfg_overrides(cfg), f"model.path={tiny_model_dir.parent / 'broken'}"]))
    text = "\n".join(report.problems)
    assert "11/0.png, 23/2.png" in text and "skip_unreadable=true" in text  # all unreadable files, one line
    # a prompt without ground truth is named; evaluation leaves it out (a dead link must not stop a table)
    assert any("have no images in their own subfolder (37" in w for w in report.warnings), report.warnings
    assert "metrics.alignment.path=" in text and "cannot be opened" in text
    assert "model.path=" in text and "lacks unet/" in text
    assert len(report.problems) == 3, text  # the unreadable files are one line


def cfg_overrides(cfg) -> list[str]:
    return [f"paths.data_dir={cfg.paths.data_dir}", "scenario=webster500", "metrics=paper",
            f"metrics.similarity.path={cfg.metrics.similarity.path}", f"metrics.alignment.path={cfg.metrics.alignment.path}",
            f"metrics.fid.path={cfg.metrics.fid.path}", f"paths.output_dir={cfg.paths.output_dir}"]


def test_damaged_images_are_made_again_on_resume(tiny_model_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["scenario=custom", f"model.path={tiny_model_dir}", "prompts=[a cat,a dog]", "images_per_prompt=2",
                 "sampler.steps=2", f"run_dir={tmp_path / 'run'}", "progress=false"]
    run(compose_config(overrides))
    images = tmp_path / "run" / "images"
    kept = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    truncated, no_record = images / "00000_1.png", images / "00001_0.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    from PIL import Image

    Image.new("RGB", (32, 32)).save(no_record)  # a PNG without memguard's record
    with caplog.at_level(logging.WARNING):
        metrics = run(compose_config(overrides))
    assert metrics["generation"]["images_made"] == 2
    assert f"{truncated} cannot be read" in caplog.text and f"{no_record} cannot be read" in caplog.text
    for name, mtime in kept.items():
        if name not in (truncated.name, no_record.name):
            assert (images / name).stat().st_mtime_ns == mtime  # nothing else rewritten
    assert len(list(images.glob("*.png"))) == 4
