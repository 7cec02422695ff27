"""docs/config.md, generated from the config schema: `python -m common.config_doc > docs/config.md`.

Each field's type and default come from the dataclasses in common/config.py, its meaning from the comment
beside or above it there, and its allowed values from common.config.CHOICES, so the reference cannot
drift from the code (tests/test_config.py fails when docs/config.md is stale).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import tokenize
from typing import Any

from common import config
from common.config import CHOICES, Config

DOC_PATH = "docs/config.md"
HEADER = """# Configuration reference

Generated from `common/config.py` by `python -m common.config_doc > docs/config.md`; do not edit by hand.

A run's config is four sections. The defaults below are the default run (`python -m torch_impl.train` with no
flags); a TOML file (`--config PATH` or a preset name from `configs/`) sets any of them, and dotted flags
override both: `--model.n_layer 6 --run.dtype bf16`. A config file of your own starts from these defaults.
"""
SECTION_TITLES = {"model": "the network's shape", "optim": "AdamW, clipping and the lr schedule",
                  "data": "the shards and the order they are read in", "run": "everything else about the run"}


def field_comments() -> dict[str, str]:
    """{"section.field": the comment text of the field in common/config.py (beside it, or the lines just above)}."""
    source = inspect.getsource(config)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    sections = {cls.__name__: name for name, cls in _section_classes().items()}
    found = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            row = item.lineno
            above = []
            r = row - 1
            while r >= 1 and lines[r - 1].strip().startswith("#"):
                above.insert(0, comments[r])
                r -= 1
            text = " ".join(above + ([comments[row]] if row in comments else []))
            found[f"{sections[node.name]}.{item.target.id}"] = text
    return found


def _section_classes() -> dict[str, type]:
    return {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def render() -> str:
    comments = field_comments()
    out = [HEADER]
    defaults = Config()
    for section, cls in _section_classes().items():
        out += [f"## [{section}]: {SECTION_TITLES[section]}", "", "| field | type | default | meaning | allowed |",
                "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            value = getattr(getattr(defaults, section), f.name)
            kind = type(value).__name__ if not isinstance(value, tuple) else "list of 2 floats"
            allowed = ", ".join(f"`{c}`" for c in CHOICES.get(dotted, ()))
            meaning = comments.get(dotted, "").replace("|", "\\|")
            out.append(f"| `{dotted}` | {kind} | `{_fmt(value)}` | {meaning} | {allowed} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
