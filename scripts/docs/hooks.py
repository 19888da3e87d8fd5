"""The configuration reference page, generated from ``conf/`` so that it cannot drift from the configs.

An mkdocs hook (``hooks:`` in mkdocs.yml): at every build it adds ``configuration.md`` to the site, written from
every ``conf/**/*.yaml``: per file, its option name (``group=option``), its comment header, and one row per key
with its full override path (``mitigation.schedule.tau``), its default as written in the YAML and the key's comment.
A new YAML appears on the next build, with nothing to edit. Run on its own it prints the page:

    python scripts/docs/hooks.py > configuration.md

The YAML is read line by line (PyYAML drops comments); tests/test_docs.py checks that the rows name every leaf
key ``yaml.safe_load`` finds, so a YAML construct this reader does not follow fails there rather than going missing.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGE = "configuration.md"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:'\"][^:#]*?|'[^']*'|\"[^\"]*\"):(?:\s+(?P<rest>.*))?$")
ITEM = re.compile(r"^(?P<indent> *)- (?P<rest>.*)$")


@dataclass
class Entry:
    """One row: the key's path inside its file, its default as written (None for a mapping), its comment."""

    path: str
    value: str | None
    comment: list[str] = field(default_factory=list)   # the key's own comment, continued on the lines under it
    above: list[str] = field(default_factory=list)     # the comment lines just above the key


@dataclass
class ConfigFile:
    """One YAML file: the comment lines before its first key (without ``# @package``), its package, its rows."""

    header: list[str]
    package: str | None   # "_global_" or None (the group's own package)
    entries: list[Entry]


def split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment): the first ``#`` after whitespace and outside quotes."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip()
    return text.rstrip(), ""


def parse(text: str) -> ConfigFile:
    """The header, package and rows of one YAML file (block mappings and lists, inline values)."""
    header: list[str] = []
    package: str | None = None
    entries: list[Entry] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the mappings that enclose the current line
    pending: list[str] = []            # comment lines above the next key
    counters: dict[str, int] = {}      # list items seen per list
    last_indent = -1
    lines = iter(text.splitlines())
    for line in lines:
        while line.split("#")[0].count("[") + line.split("#")[0].count("{") > \
                line.split("#")[0].count("]") + line.split("#")[0].count("}"):  # a flow list or mapping goes on
            line = line.rstrip() + " " + next(lines).strip()
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if stripped.startswith("# @package"):
                package = stripped.split()[-1]
            elif not entries and not stack:
                header.append(stripped[2:] if stripped.startswith("# ") else comment)
            elif entries and entries[-1].comment and indent > last_indent and not pending:  # a comment, continued
                entries[-1].comment.append(comment)
            else:
                pending.append(comment)
            continue
        item = ITEM.match(line)
        if item:  # a list item: of the key above it (indented deeper, or at its indent in YAML's compact style)
            while stack and stack[-1][0] > indent:
                stack.pop()
            parent = ".".join(k for _, k in stack)
            index = counters.get(parent, 0)
            counters[parent] = index + 1
            value, comment = split_comment(item.group("rest"))
            entries.append(Entry(f"{parent}[{index}]", value, [comment] if comment else [], pending))
            pending, last_indent = [], indent
            continue
        key = KEY.match(line)
        if not key:
            raise ValueError(f"cannot read this YAML line: {line!r}")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        name = key.group("key").strip("'\"")
        value, comment = split_comment(key.group("rest") or "")
        path = ".".join([*(k for _, k in stack), name])
        entries.append(Entry(path, value if value else None, [comment] if comment else [], pending))
        pending, last_indent = [], indent
        if not value:
            stack.append((indent, name))
    return ConfigFile(header, package, entries)


def leaf_paths(node: Any, prefix: str = "") -> set[str]:
    """Every leaf of a loaded YAML document as the rows name it (``a.b``, ``a[0]``); an empty mapping or list is
    a leaf."""
    if isinstance(node, dict) and node:
        return set().union(*(leaf_paths(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in node.items()))
    if isinstance(node, list) and node:
        return set().union(*(leaf_paths(v, f"{prefix}[{i}]") for i, v in enumerate(node)))
    return {prefix}


def rows_cover(parsed: ConfigFile) -> set[str]:
    """The leaves the rows hold: a row's value read as YAML (a flow list or mapping, or a list item holding a
    mapping such as ``- override /scenario: webster500``, covers its children)."""
    import yaml

    paths: set[str] = set()
    for entry in parsed.entries:
        if entry.value is not None:
            try:
                value = yaml.safe_load(entry.value)
            except yaml.YAMLError:
                value = entry.value
            paths |= leaf_paths(value, entry.path)
    return paths


def _text(comment: str) -> str:
    """A comment as table-cell Markdown: code spans kept, everything else escaped (``_target_``, ``<name>``, ``|``)."""
    parts = comment.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick: no code spans at all
        parts = [comment]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append("`" + part.replace("|", "\\|") + "`")
        else:
            out.append(re.sub(r"([\\*_\[\]|#])", r"\\\1", part).replace("<", "&lt;").replace(">", "&gt;"))
    return "".join(out)


def _code(value: str) -> str:
    fence = "``" if "`" in value else "`"
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value.replace('|', chr(92) + '|')}{pad}{fence}"


def option_heading(conf: Path, path: Path) -> tuple[str, str, str]:
    """(the option as written on the command line, its anchor, the package its keys live in)."""
    rel = path.relative_to(conf)
    if rel.parent == Path("."):
        return "The root config", "root", ""
    group = rel.parent.as_posix()
    return f"{group}={rel.stem}", f"{group.replace('/', '-')}-{rel.stem}", group.replace("/", ".")


def render_file(conf: Path, path: Path) -> list[str]:
    """One config's section: its heading, file and package, its comment header, one row per key."""
    parsed = parse(path.read_text())
    title, anchor, package = option_heading(conf, path)
    if parsed.package == "_global_":
        package = ""
    heading = f"### `{title}`" if path.parent != conf else f"## {title}"
    lines = [f"{heading} {{#{anchor}}}", "",
             f"File `conf/{path.relative_to(conf).as_posix()}`; its keys are "
             + (f"under `{package}`." if package else "global (`# @package _global_`)." if parsed.package else
                "the root of the config."), ""]
    if parsed.header:
        lines += ["```text", *parsed.header, "```", ""]
    if parsed.entries:
        lines += ["| key | default | comment |", "| --- | --- | --- |"]
        for entry in parsed.entries:
            if entry.value is None and not entry.comment and not entry.above:
                continue  # a mapping without a word of its own: its keys' rows follow
            key = ".".join(p for p in (package, entry.path) if p)
            value = "" if entry.value is None else _code(entry.value)
            comment = "<br>".join(_text(" ".join(c)) for c in (entry.above, entry.comment) if c)
            lines.append(f"| `{key}` | {value} | {comment} |")
        lines.append("")
    return lines


def render(conf: Path = ROOT / "conf") -> str:
    """The whole page: the root config, then each group (alphabetically) with its options."""
    files = sorted(conf.rglob("*.yaml"), key=lambda p: (p.parent != conf, p.relative_to(conf).as_posix()))
    groups = sorted({p.parent.relative_to(conf).as_posix() for p in files if p.parent != conf})
    lines = [
        "# Configuration reference",
        "",
        "Every key of every config under `conf/`, with its default as the YAML writes it and the YAML's own comments.",
        "This page is generated from the configs at each build (`scripts/docs/hooks.py`, an mkdocs hook), so it is",
        "what memguard runs with. Override any key on the command line (`memguard run key=value`), choose an option",
        "of a group with `group=option` (`mitigation=stp`), and see the composed config of a command with",
        "`memguard run --cfg job` (Hydra). `${...}` is an interpolation, resolved when the config is composed;",
        "`???` is a value you must give.",
        "",
        "Groups: " + ", ".join(f"[`{g}`](#{g.replace('/', '-')})" for g in groups) + ".",
        "",
    ]
    root = conf / "config.yaml"
    if root.is_file():
        lines += render_file(conf, root)
    for group in groups:
        options = sorted(p for p in files if p.parent.relative_to(conf).as_posix() == group)
        lines += [f"## `{group}` {{#{group.replace('/', '-')}}}", "",
                  "Options: " + ", ".join(f"[`{p.stem}`](#{option_heading(conf, p)[1]})" for p in options) + ".", ""]
        for path in options:
            lines += render_file(conf, path)
    return "\n".join(lines)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs: add the generated page to the site's files (mkdocs >= 1.6, ``File.generated``)."""
    from mkdocs.structure.files import File

    conf = Path(config.config_file_path).resolve().parent / "conf"
    files.append(File.generated(config, PAGE, content=render(conf)))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """mkdocs serve: rebuild when a config changes."""
    server.watch(str(Path(config.config_file_path).resolve().parent / "conf"))
    return server


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
