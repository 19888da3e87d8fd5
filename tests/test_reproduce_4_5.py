"""`make fetch` then `make reproduce` for Tables 4 and 5 against stand-in hosts: tests/test_reproduce.py's test
(which runs Tables 1-3), in a file of its own so that another worker runs it beside that one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_reproduce import fetch_and_reproduce

pytestmark = pytest.mark.slow


def test_make_fetch_then_make_reproduce_tables_4_and_5(tiny_model_dir: Path, tmp_path: Path) -> None:
    fetch_and_reproduce((4, 5), tiny_model_dir, tmp_path)
