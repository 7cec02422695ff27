"""A config from files and flags: a TOML preset or path, then dotted overrides (`--model.n_layer 6`), and back.

Every value is coerced to its field's type and checked against the schema's fields (common/config.py), so a
typo or a value of the wrong type is one ConfigError naming the file or flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from common.config import SECTION_TYPES, Config, ConfigError
from common.usage import Parser

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "default"
# Fields older versions wrote into checkpoints' meta.json and that no longer exist: skipped when reading one.
RETIRED = {("run", "progress")}
# Fields older versions wrote under another name: read into their new place.
MOVED = {("model", "loss_chunk_rows"): ("run", "loss_chunk_rows")}


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert a TOML or CLI value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            if len(items) != len(default):
                raise ValueError
            return tuple(_coerce(v, d, where) for v, d in zip(items, default))
        if isinstance(default, str):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError):
        pass
    raise ConfigError(f"{where}: cannot read {value!r} as {type(default).__name__}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> Config:
    if section not in SECTION_TYPES:
        raise ConfigError(f"{where}: unknown section '{section}' (expected one of {', '.join(SECTION_TYPES)})")
    sub = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(sub)}
    if key not in names:
        raise ConfigError(f"{where}: unknown key '{section}.{key}'")
    new_value = _coerce(value, getattr(sub, key), where)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{key: new_value})})


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`gpt2-124m`) or a path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():  # not is_dir(): "parity" is also a package folder
        if not p.exists():
            raise ConfigError(f"--config: file not found: {p}")
        return p
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if not preset.exists():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.toml")))
        raise ConfigError(f"--config: no preset '{name_or_path}' (known: {known})")
    return preset


def load_toml(path: Path, cfg: Config | None = None) -> Config:
    cfg = cfg or Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (TOML is UTF-8 text)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key '{section}' must be a [section] table")
        for key, value in table.items():
            cfg = _apply(cfg, section, key, value, f"{path}")
    return cfg


def parse_overrides(cfg: Config, overrides: Sequence[str]) -> list[tuple[str, str]]:
    """(`section.key`, value text) of each `--section.key value` / `--section.key=value`, in order; a bare
    boolean flag (`--run.compile`) means true. Anything else is an error."""
    pairs = []
    i = 0
    overrides = list(overrides)
    while i < len(overrides):
        tok = overrides[i]
        if not tok.startswith("--") or "." not in tok:
            raise ConfigError(f"unrecognized argument '{tok}' (overrides look like --model.n_layer 6)")
        if "=" in tok:
            dotted, value = tok[2:].split("=", 1)
            i += 1
        else:
            dotted = tok[2:]
            nxt = overrides[i + 1] if i + 1 < len(overrides) else None
            if nxt is None or nxt.startswith("--"):
                section, _, key = dotted.partition(".")
                if not isinstance(getattr(getattr(cfg, section, None), key, None), bool):
                    raise ConfigError(f"--{dotted}: missing value")
                value = "true"
                i += 1
            else:
                value = nxt
                i += 2
        pairs.append((dotted, value))
    return pairs


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply `--section.key value` / `--section.key=value` pairs (parse_overrides); anything else is an error."""
    for dotted, value in parse_overrides(cfg, overrides):
        section, _, key = dotted.partition(".")
        cfg = _apply(cfg, section, key, value, f"--{dotted}")
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (used to read the config stored in a checkpoint)."""
    cfg = Config()
    for section, table in d.items():
        for key, value in table.items():
            if (section, key) not in RETIRED:
                cfg = _apply(cfg, *MOVED.get((section, key), (section, key)), value, "checkpoint config")
    return cfg


@dataclass
class Args:
    config: Config
    config_path: Path
    resume: str | None  # None: fresh run; "latest": newest checkpoint in run.out_dir; else a path
    extra: dict[str, Any]


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=description,
               epilog="Any config field can be overridden: --model.n_layer 6 --run.dtype bf16 ...")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="preset name in configs/ (default, gpt2-124m, gpt2-350m, ...) or a TOML path")
    return p


def parse_args(argv: Sequence[str] | None, prog: str, description: str,
               parser: argparse.ArgumentParser | None = None) -> Args:
    """Parse `--config`, `--resume [path]`, extra flags of `parser`, and dotted overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser(prog, description)
    if not any(a.option_strings == ["--resume"] for a in parser._actions):
        parser.add_argument("--resume", nargs="?", const="latest", default=None,
                            help="continue from the newest checkpoint in run.out_dir, or from the given path")
    ns, rest = parser.parse_known_args(argv)
    path = resolve_config_path(ns.config)
    cfg = apply_overrides(load_toml(path), rest)
    extra = {k: v for k, v in vars(ns).items() if k not in ("config", "resume")}
    return Args(config=cfg, config_path=path, resume=ns.resume, extra=extra)


def dump_toml(cfg: Config) -> str:
    """The config as TOML that load_toml reads back to an equal Config (for child processes, run folders)."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        return repr(v)
    lines = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)
