"""Loading a diffusers folder: what is read once per process and when it is read again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memguard.components import load_components


def test_a_folders_tokenizer_is_read_once_and_again_when_its_files_change(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    first = load_components(tiny_model_dir).tokenizer
    assert load_components(tiny_model_dir).tokenizer is first  # a sweep's jobs share it
    folder = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert load_components(folder).tokenizer is not first  # another folder
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "model_max_length": 60}))
    changed = load_components(folder).tokenizer
    assert changed.model_max_length == 60 != first.model_max_length
    assert first("a cat", padding="max_length", max_length=77).input_ids == changed(
        "a cat", padding="max_length", max_length=77).input_ids
