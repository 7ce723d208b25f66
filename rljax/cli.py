"""Dataclass configs with command-line overrides, for experiments and benchmarks.

    @dataclass
    class Config:
        steps: int = 100
        preset: str = "small"
        smoke: bool = False

    cfg = parse_config(Config)          # python -m experiments.x --steps 10 --smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build `cls` from its defaults and `--field value` flags (`--flag` alone sets a bool True)."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if typing.get_origin(typ) in (typing.Union, types.UnionType):  # `X | None`: parse as X
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        if typ is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default, metavar="BOOL")
        elif typing.get_origin(typ) in (tuple, list):
            (inner, *_) = typing.get_args(typ) or (str,)
            parser.add_argument(flag, type=inner, nargs="+", default=default)
        else:
            parser.add_argument(flag, type=typ, default=default)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        v = args[f.name]
        if typing.get_origin(hints[f.name]) is tuple and isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    return cls(**values)


def make_run_dir(root: str, name: str) -> str:
    """A new directory `root/name-YYYYmmdd-HHMMSS` (suffixed if it exists)."""
    base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, i = base, 1
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    os.makedirs(path)
    return path


def save_config(cfg, run_dir: str) -> None:
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
