"""memguard as a built wheel, installed into a fresh virtual environment, outside the clone: it finds its configs and
the tiny models as package data, `memguard --help` and `memguard run` (the tiny2 default) work from an empty folder.

The wheel is installed without its dependencies (``--no-deps``, no index): they come from this interpreter's
site-packages through a ``.pth`` file, so pip never fetches anything (a CUDA torch least of all)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# what a clone holds beyond the sources: never copied into the build
IGNORED = shutil.ignore_patterns(".git", ".venv", "outputs", "site", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", "random-tiny-sd")


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})})
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin/`` folder of a fresh virtual environment holding only memguard's wheel (built from a copy of the
    sources, so the clone gets no build/ folder)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=IGNORED)
    sh(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
       cwd=source)
    (wheel,) = (root / "dist").glob("memguard-*.whl")
    venv = root / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    sh(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q",
       wheel, cwd=root)
    purelib = sh(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                 cwd=root).stdout.strip()
    (Path(purelib) / "memguard_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_holds_the_configs_and_the_tiny_model(installed: Path, tmp_path: Path) -> None:
    where = sh(installed / "python", "-c", "import memguard; print(memguard.__file__); print(memguard.CONF_DIR)",
               cwd=tmp_path).stdout.split()
    package = Path(where[0]).parent
    assert installed.parent in package.parents and not package.is_relative_to(ROOT)  # not the clone's
    assert Path(where[1]) == package / "conf" and (package / "conf" / "config.yaml").is_file()
    assert (package / "models" / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (package / "models" / "tiny2" / "calibration.json").is_file()  # the second miniature, calibrated
    assert not (package / "models" / "random-tiny-sd").exists()  # built by make install, not shipped


def test_help_and_the_default_run_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    assert "memguard run" in sh(installed / "memguard", "--help", cwd=tmp_path).stdout
    assert sh(installed / "memguard", "run", "--help", cwd=tmp_path).stdout.startswith("usage: memguard run")
    sh(installed / "memguard", "run", "images_per_prompt=1", "sampler.steps=2", "progress=false", "threads=1",
       cwd=tmp_path)
    run_dir = tmp_path / "outputs" / "runs" / "tiny2" / "none"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_images"] == len(list((run_dir / "images").glob("*.png"))) > 0
    assert "similarity" in metrics and "alignment" in metrics  # evaluated with the shipped classifier
    assert "/models/tiny2" in (run_dir / "config.yaml").read_text() and str(ROOT) not in (run_dir / "config.yaml").read_text()
