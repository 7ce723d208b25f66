from dataclasses import dataclass

import pytest

from rljax.cli import parse_config


@dataclass
class Cfg:
    steps: int = 10
    lr: float = 1e-3
    preset: str = "tiny"
    smoke: bool = False
    sizes: tuple[int, ...] = (1, 2)
    note: str | None = None
    scan: bool | None = None


def test_defaults_and_overrides():
    assert parse_config(Cfg, []) == Cfg()
    c = parse_config(Cfg, ["--steps", "3", "--lr", "0.5", "--smoke", "--sizes", "4", "5", "6", "--note", "x"])
    assert c == Cfg(steps=3, lr=0.5, smoke=True, sizes=(4, 5, 6), note="x")
    assert parse_config(Cfg, ["--smoke", "false"]).smoke is False
    assert parse_config(Cfg, ["--scan", "false"]).scan is False and parse_config(Cfg, []).scan is None


def test_bad_values_exit_with_usage():
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--steps", "many"])
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--unknown-flag", "1"])
