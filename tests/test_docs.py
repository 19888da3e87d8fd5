"""The documentation: the site builds strictly, the README is a front door, the configuration reference covers
every key of conf/, and nothing the README held before the site existed is lost (docs/moved.yaml)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MOVED = yaml.safe_load((ROOT / "docs" / "moved.yaml").read_text())
# the five things people do: the README's headings for them
TASKS = ("Run a mitigation on your own model", "Reproduce a paper table", "Map the attraction basin",
         "Compare mitigations", "Run at scale")
COMMAND = re.compile(r"^(memguard|make|accelerate|\.venv/bin/memguard) ", re.MULTILINE)
LINK = re.compile(r"(!?\[[^\]]*\])\([^)\s]*\)")
FENCE = re.compile(r"^```[^\n]*\n.*?^```$", re.MULTILINE | re.DOTALL)


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def headings(text: str) -> list[str]:
    """The Markdown headings of a page, outside code blocks, without their level or an ``{#anchor}``."""
    return [re.sub(r"\s*\{#[^}]*\}$", "", m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", FENCE.sub("", text),
                                                                         re.MULTILINE)]


def sections(text: str) -> dict[str, str]:
    """Each heading's text to the text under it, up to the next heading of any level (code blocks' ``#`` lines
    are not headings)."""
    out: dict[str, list[str]] = {}
    current, fence = None, False
    for line in text.splitlines():
        fence ^= line.startswith("```")
        heading = None if fence else re.match(r"^#{1,6} (.+)$", line)
        if heading:
            current = out.setdefault(heading.group(1), [])
        elif current is not None:
            current.append(line)
    return {heading: "\n".join(lines) for heading, lines in out.items()}


def normal(line: str) -> str:
    """A line as compared with the old README's: stripped, each Markdown link by its text alone (a link that went
    to a README anchor goes to a page now)."""
    return LINK.sub(r"\1", line.strip())


def new_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


# --- the site -----------------------------------------------------------------------------------------------------

def test_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs.yml's validation makes a broken link or anchor and a page outside `nav` warnings, which --strict
    turns into errors."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index", "configuration", "mitigations", "protocol", "tiny", "notebook"):
        assert (tmp_path / "site" / f"{page}.html").is_file(), page
    built = (tmp_path / "site" / "configuration.html").read_text()
    assert "mitigation.schedule.tau" in built and "conf/mitigation/stp.yaml" in built


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The check above can fail: the same site with one link to a heading that does not exist does not build."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "index.md").open("a") as page:
        page.write("\n[nowhere](protocol.md#no-such-heading)\n")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode != 0 and "no-such-heading" in result.stdout + result.stderr


def test_configuration_reference_has_every_key_of_every_config() -> None:
    """Every YAML under conf/ is on the page, and its rows name every leaf key yaml.safe_load finds in it (the
    page's reader follows comments line by line, so a construct it misreads shows up here as a missing key)."""
    hooks = _hooks()
    page = hooks.render(ROOT / "conf")
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        rel = path.relative_to(ROOT / "conf").as_posix()
        assert f"File `conf/{rel}`" in page, rel
        parsed = hooks.parse(path.read_text())
        assert hooks.rows_cover(parsed) == hooks.leaf_paths(yaml.safe_load(path.read_text()) or {}), rel


def test_configuration_reference_reads_header_keys_defaults_and_comments(tmp_path: Path) -> None:
    """An invented group option: its comment header, package, nested keys with defaults, inline and continued
    comments, a flow list over two lines and a defaults list all reach the page."""
    (tmp_path / "widget").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  - widget: fancy   # the widget\nsize: 3\n")
    (tmp_path / "widget" / "fancy.yaml").write_text(
        "# A fancy widget: it does X.\n#   memguard run widget=fancy\nname: fancy\n"
        "inner:\n  depth: 2        # how deep; 0 = flat\n                  # (continued)\n"
        "  # about the list below\n  items: [a, b,\n          c]\nquote: \"x # not a comment\"\n")
    hooks = _hooks()
    page = hooks.render(tmp_path)
    assert "### `widget=fancy` {#widget-fancy}" in page
    assert "A fancy widget: it does X.\n  memguard run widget=fancy\n```" in page
    assert "| `widget.inner.depth` | `2` | how deep; 0 = flat (continued) |" in page
    assert "| `widget.inner.items` | `[a, b, c]` | about the list below |" in page
    assert "| `widget.quote` | `\"x # not a comment\"` |  |" in page
    assert "| `defaults[0]` | `widget: fancy` | the widget |" in page and "| `size` | `3` |  |" in page


# --- the README ---------------------------------------------------------------------------------------------------

def test_readme_is_a_front_door() -> None:
    """At most 300 lines; a command and a page for each of the five tasks; every page it links exists."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    under = sections(text)
    for task in TASKS:
        assert task in under, f"README has no section '{task}'"
        blocks = FENCE.findall(under[task])
        assert blocks and COMMAND.search(blocks[0].split("\n", 1)[1]), f"'{task}' shows no command"
        assert re.search(r"\]\(docs/[a-z-]+\.md", under[task]), f"'{task}' links no page"
    for target, anchor in re.findall(r"\]\((docs/[^)#\s]+)(#[^)\s]+)?\)", text):
        page = ROOT / target
        assert page.exists(), target
        if anchor:
            from markdown.extensions.toc import slugify

            assert anchor[1:] in {slugify(h, "-") for h in headings(page.read_text())}, target + anchor
    assert "| mitigation | what it does | defaults |" in text


def test_readme_quick_start_is_what_ci_runs() -> None:
    """The README's two commands for a fresh machine are the ones .ci/run runs, as written."""
    quick = sections(README.read_text())["Quick start (fresh machine, CPU is enough)"]
    commands = [line for line in FENCE.findall(quick)[0].splitlines()[1:-1] if line and not line.startswith("#")]
    assert commands == ["make install && .venv/bin/memguard run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci for command in commands)


# --- nothing lost -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def old_readme() -> str:
    try:
        result = subprocess.run(["git", "-C", str(ROOT), "show", f"{MOVED['readme_commit']}:README.md"],
                                capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("git is not installed: the old README cannot be read")
    if result.returncode != 0:
        pytest.skip(f"the old README (commit {MOVED['readme_commit'][:7]}) is not in this checkout's history "
                    f"(a shallow or exported copy): {result.stderr.strip()}")
    return result.stdout


def test_every_old_section_is_mapped_to_a_page_that_holds_it(old_readme: str) -> None:
    old = headings(old_readme)
    assert set(old) == set(MOVED["sections"]), set(old) ^ set(MOVED["sections"])
    for heading, targets in MOVED["sections"].items():
        for target in targets:
            path = ROOT / target
            assert path.is_file(), f"{heading!r} maps to {target}, which does not exist"
            assert heading in headings(path.read_text()), f"{target} has no heading {heading!r}"


def test_every_old_code_block_is_kept_verbatim(old_readme: str) -> None:
    """Verbatim, except the lines docs/moved.yaml corrects (each replaced by its correction)."""
    new = "\n".join(path.read_text() for path in new_files())
    blocks = FENCE.findall(old_readme)
    assert len(blocks) == sum(line.startswith("```") for line in old_readme.splitlines()) // 2 >= 10
    for block in blocks:  # with any line docs/moved.yaml corrects replaced by its correction
        for correction in MOVED["corrections"]:
            block = block.replace(correction["old"], correction["new"])
        assert block in new, f"code block lost:\n{block}"


def test_every_old_line_with_a_number_is_kept(old_readme: str) -> None:
    """Verbatim (links compared by their text), or corrected in docs/moved.yaml with the line that replaces it."""
    new_lines = {normal(line) for path in new_files() for line in path.read_text().splitlines()}
    corrections = {c["old"]: c for c in MOVED["corrections"]}
    old_lines = {normal(line) for line in old_readme.splitlines()}
    for old, correction in corrections.items():
        assert old in old_lines, f"a correction names a line the old README does not have: {old}"
        assert correction["new"] in new_lines and correction["why"], f"the correction is not in place: {old}"
    text = FENCE.sub("", old_readme)
    for name in MOVED["regenerated"]:
        text = re.sub(f"<!-- {name}:start -->.*?<!-- {name}:end -->", "", text, flags=re.DOTALL)
    checked = [normal(line) for line in text.splitlines()
               if re.search(r"\d", line) and not line.startswith("#")]
    assert len(checked) >= 300
    lost = [line for line in checked if line not in new_lines and line not in corrections]
    assert not lost, f"{len(lost)} line(s) of the old README are in no page:\n" + "\n".join(lost[:20])


# --- per-command help ---------------------------------------------------------------------------------------------

def commands() -> list[str]:
    """Every sub-command the top-level usage lists."""
    from memguard.cli import USAGE

    return [m.group(1) for m in re.finditer(r"^\s*memguard ([a-z][a-z-]*)\b", USAGE, re.MULTILINE)]


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`memguard COMMAND --help` for each command of the usage: what it does, its options or main keys, an example;
    the page it names exists and has the heading it links to."""
    from markdown.extensions.toc import slugify

    from memguard.cli import COMMAND_DOCS, COMMAND_HELP, command_help, main

    names = commands()
    assert {"run", "tables", "calibrate", "plot", "random-model"} <= set(names)
    for name in names:
        if name in COMMAND_HELP:
            text = command_help(name)
        else:
            with pytest.raises(SystemExit) as exit_:
                main([name, "--help"])
            assert exit_.value.code == 0, name
            text = capsys.readouterr().out
        assert text.startswith(f"usage: memguard {name}"), name
        assert re.search(r"^example:\n  memguard ", text, re.MULTILINE), f"memguard {name} --help has no example"
        if name in COMMAND_DOCS:
            assert f"more: {COMMAND_DOCS[name]} " in text
    for name, target in COMMAND_DOCS.items():
        page, _, anchor = target.partition("#")
        assert (ROOT / page).is_file(), (name, page)
        assert not anchor or anchor in {slugify(h, "-") for h in headings((ROOT / page).read_text())}, (name, target)


@pytest.mark.slow  # a whole process (Hydra composes the config; no torch): about 1 s
def test_run_help_is_memguards_then_hydras(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "memguard.cli", "run", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    ours, _, hydras = result.stdout.partition("Every key and group (Hydra) follows.")
    assert ours.startswith("usage: memguard run [key=value ...]") and "more: docs/getting-started.md" in ours
    assert "== Config ==" in hydras and "mitigation: auto, dtp" in hydras and "guidance:" in hydras
