"""Dataclass configs with command-line overrides, for experiments and benchmarks.

    @dataclass
    class Config:
        steps: int = 100
        preset: str = "small"
        smoke: bool = False

    def main(cfg: Config):
        if cfg.smoke:
            apply_preset(cfg, steps=5, preset="tiny")   # explicit flags win over the preset
        ...

    if __name__ == "__main__":
        run(main, Config)                   # python -m experiments.x --steps 10 --smoke

Rules that keep a run directory honest:

- Flags are exact: `--step 5` is an error, not `--steps 5` (no abbreviations). A bool field
  is `--flag` (true), `--flag false` or `--no-flag`.
- A preset (`--smoke`) sets only the fields the user did not set: `apply_preset`
  skips the fields given on the command line (`parse_config` records them) and
  those whose value differs from the dataclass default (so `Config(smoke=True,
  steps=20)` built in Python keeps its 20 too).
- `save_config` writes config.json once; a rerun in the same run directory (a resume)
  must have the same configuration, or it stops with ConfigMismatchError naming each
  differing field, before anything is written. `allow_change=True` (the experiments'
  `--force-config`) overwrites it and appends the change to config_changes.jsonl. A field
  added after runs were saved (ADDED_FIELDS, e.g. `task`, `teacher_run_dir`) counts, when a saved
  config.json lacks it, as the value those runs had ("arithmetic", None), so they still resume.
- `check_input_dir` makes a missing input run directory (`--sft-run-dir`) an error
  naming the flag, unless the caller asked to create it.
- `LoggingFlags`, a base class of the experiments' configs, adds where metrics go besides
  metrics.jsonl: `--tensorboard` / `--no-tensorboard` and `--wandb` (offline by default; with
  `--wandb-project`, `--wandb-mode`, `--wandb-group`). They are IGNORED_FIELDS: a resume may
  change them.
- Several processes (hosts) run one study when the environment names them (the RLJAX_* / JAX_*
  coordinator variables, or RLJAX_DISTRIBUTED=auto in a TPU pod / SLURM / Open MPI job;
  `rljax.distributed.initialize`): `run(main, Config, processes=True)`
  connects them (other experiments exit saying they run on one process), `make_run_dir` gives every
  process process 0's directory, and `save_config` is checked by all and written by process 0.
- `run(main, Config)` turns on the persistent compilation cache (`rljax.compile_cache`), and
  exits a preempted run (SIGTERM/SIGINT, `rljax.phases.Preempted`) with its one-line message
  on stderr and exit code 128 + signal: 143 for SIGTERM, 130 for SIGINT, as a shell reports
  a process ended by that signal.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import textwrap
import time
import tokenize
import types
import typing
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

_UNSET = object()  # argparse default: tells a flag left out from one given with the default's value
_EXPLICIT_ATTR = "_cli_explicit"  # where parse_config records the fields given on the command line
CONFIG_FILE = "config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"
# Fields that say where a run lives, how it is shown and how often it logs or saves, not what it computes: a
# resume may change them (as the recipes' RESUMABLE_CHANGES and the pipelines' REPORTING_FIELDS)
IGNORED_FIELDS = ("run_dir", "run_root", "progress", "force_config", "tensorboard", "wandb", "wandb_project",
                  "wandb_mode", "wandb_group", "log_every", "eval_every", "checkpoint_every")


@dataclasses.dataclass
class LoggingFlags:
    """Where an experiment's metrics go besides <run_dir>/metrics.jsonl (a base class of its Config).

    tensorboard: None mirrors them to <run_dir>/tb when tensorboardX is installed (the `tensorboard`
    extra; `--tensorboard` requires it, `--no-tensorboard` turns it off). wandb: also log them to
    Weights & Biases (the `wandb` extra), one W&B run per run directory, in wandb_mode "offline" (files
    under <run_dir>/wandb, `wandb sync` uploads them later) or "online"; wandb_project, wandb_group:
    where the runs are filed (a study's runs share a group).
    """

    tensorboard: bool | None = None  # mirror the metrics to <run_dir>/tb (None: when tensorboardX is installed)
    wandb: bool = False  # also log them to Weights & Biases (the wandb extra)
    wandb_project: str = "rljax"  # the W&B project the runs are filed under
    wandb_mode: str = "offline"  # offline (files under <run_dir>/wandb; `wandb sync` uploads them) | online
    wandb_group: str | None = None  # the W&B group (a study's runs share one)

    def __post_init__(self):
        from rljax.metrics import WANDB_MODES

        if self.wandb_mode not in WANDB_MODES:  # refused before anything runs, not when the first phase starts
            raise ValueError(f"--wandb-mode: one of {WANDB_MODES}, got {self.wandb_mode!r}")

    def loop_logging(self) -> dict:
        """`LoopConfig`'s tensorboard and wandb fields for these flags: `LoopConfig(..., **cfg.loop_logging())`."""
        from rljax.metrics import WandbConfig

        wandb = WandbConfig(project=self.wandb_project, mode=self.wandb_mode, group=self.wandb_group) \
            if self.wandb else None
        return dict(tensorboard=self.tensorboard, wandb=wandb)

    def logging_flags(self) -> dict:
        """These flags' values by field name, to hand them to another config (a study's runs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LoggingFlags)}


@dataclasses.dataclass
class MeshFlags:
    """The devices an experiment computes on (a base class of its Config): `--mesh-data`, `--mesh-fsdp`,
    `--mesh-tensor` devices along each axis of `rljax.sharding.make_mesh` (all 1: no mesh, one device).
    On several processes a mesh over all their devices is required: `mesh()` refuses none, naming the
    flags."""

    mesh_data: int = 1  # devices along each mesh axis (all 1: no mesh, one device)
    mesh_fsdp: int = 1
    mesh_tensor: int = 1

    def mesh_axes(self) -> dict:
        return dict(data=self.mesh_data, fsdp=self.mesh_fsdp, tensor=self.mesh_tensor)

    def mesh(self):
        """`make_mesh(data, fsdp, tensor)` of these flags, or None when all are 1 on one process."""
        import jax

        from rljax.sharding import make_mesh

        if set(self.mesh_axes().values()) == {1}:
            if jax.process_count() > 1:
                raise ValueError(f"--mesh-data / --mesh-fsdp / --mesh-tensor: {jax.process_count()} processes are "
                                 f"running: pass a mesh over all their {jax.device_count()} devices (data x fsdp a "
                                 f"multiple of the process count), and --run-dir or --run-root on a file system "
                                 f"they share")
            return None
        return make_mesh(**self.mesh_axes())


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the comment written beside it in the class body} for `cls` and its dataclass bases
    (`steps: int = 100  # optimizer steps` gives "optimizer steps"); {} where the source is not
    available (a class built in an interactive session)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        by_line: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                said = [by_line[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in by_line]
                if said:
                    comments[node.target.id] = " ".join(said)
    return comments


def _description(cls: type) -> str | None:
    """The class's docstring, or (a dataclass without one gets its signature as __doc__) the
    docstring of the module that defines it: an experiment's usage lines."""
    doc = cls.__doc__
    if doc and not doc.startswith(cls.__name__ + "("):
        return inspect.cleandoc(doc)
    module = sys.modules.get(cls.__module__)
    return inspect.cleandoc(module.__doc__) if module is not None and module.__doc__ else None


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, except that the text none (any case) is None: how a flag sets an `X | None` field back to None."""
    def parse_or_none(text: str):
        return None if text.strip().lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in "invalid <name> value"
    return parse_or_none


def _without_none(typ):
    """X of `X | None`; other types as they are."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(typ) if a is not type(None))
    return typ


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Build `cls` from its defaults and `--field value` flags (`--flag` alone sets a bool True,
    `--no-flag` False).

    Flags must be spelled out (argparse's prefix matching is off, so a typo is an error,
    not another field). The names of the fields given on the command line are recorded on
    the instance for `explicit_fields` / `apply_preset`. `--help` shows `description` (default:
    the class's docstring, else its module's), and beside each flag the comment written after
    its field in the class body and its default.
    """
    parser = argparse.ArgumentParser(description=description or _description(cls), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        said = comments.get(f.name, "")
        # argparse %-formats help strings: a literal % must be doubled
        help_text = (f"{said} " if said else "").replace("%", "%%") + f"(default: {_default(f)!r})".replace("%", "%%")
        optional = type(None) in typing.get_args(typ)
        typ = _without_none(typ)  # `X | None`: parse as X, and `none` gives None
        if typ is bool:
            parser.add_argument(flag, type=_or_none(_parse_bool) if optional else _parse_bool, nargs="?", const=True,
                                default=_UNSET, metavar="BOOL", help=help_text)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_const", const=False,
                                default=_UNSET, help=f"{flag} false")
        elif typing.get_origin(typ) in (tuple, list):
            (inner, *_) = typing.get_args(typ) or (str,)
            parser.add_argument(flag, type=_or_none(inner) if optional else inner, nargs="+", default=_UNSET,
                                help=help_text)
        else:
            parser.add_argument(flag, type=_or_none(typ) if optional else typ, default=_UNSET, help=help_text)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    explicit = set()
    for f in dataclasses.fields(cls):
        v = args[f.name]
        if v is _UNSET:
            v = _default(f)
        else:
            explicit.add(f.name)
        if isinstance(v, list) and None in v:  # `--field none` of an optional list
            if v != [None]:
                parser.error(f"--{f.name.replace('_', '-')}: none stands alone (it sets the field to None)")
            v = None
        if isinstance(v, list) and typing.get_origin(_without_none(hints[f.name])) is tuple:
            v = tuple(v)
        values[f.name] = v
    cfg = cls(**values)
    object.__setattr__(cfg, _EXPLICIT_ATTR, frozenset(explicit))  # object.__setattr__: frozen classes too
    return cfg


def explicit_fields(cfg) -> frozenset[str]:
    """Fields of the dataclass instance `cfg` that the user set: given on the command line
    (recorded by parse_config) or holding a value other than the field's default."""
    given = getattr(cfg, _EXPLICIT_ATTR, frozenset())
    return frozenset(given) | {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f)}


def apply_preset(cfg, **values) -> frozenset[str]:
    """Set each field named in `values` (a preset such as --smoke's sizes) unless the user set
    it (`explicit_fields`); returns the names of the fields the preset left alone."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"apply_preset: {type(cfg).__name__} has no field(s) {unknown}")
    keep = explicit_fields(cfg) & set(values)
    for name, value in values.items():
        if name not in keep:
            setattr(cfg, name, value)
    return frozenset(keep)


class ConfigMismatchError(ValueError):
    """A run directory's config.json holds another configuration than the one given."""


def json_value(x) -> str:
    """A value JSON has no type for, as text that is the same in every process: a function (an
    Algorithm's halves, a reward transform's) by its module and name, anything else by str()
    without its memory address."""
    if callable(x) and hasattr(x, "__qualname__"):
        return f"{getattr(x, '__module__', '?')}.{x.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(x))


def flat_fields(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"optimizer.lr": ..., ...}, so that a difference names its field."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(cfg) -> dict:
    """asdict(cfg) as it reads back from JSON (tuples become lists), to compare like with like."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


_ABSENT = "<absent>"
# Fields added to the experiments' configs after run directories were saved without them: {field: the value
# an old run had}. A config.json that lacks one is read as holding that value (every run before `task` existed
# was on the arithmetic task), so those runs resume and compare equal to the same run today.
ADDED_FIELDS = {"task": "arithmetic", "teacher_run_dir": None, "remat": "none", "mesh_data": 1, "mesh_fsdp": 1,
                "mesh_tensor": 1, "reward_format": "auto"}


def config_differences(old: dict, new: dict, ignore: Iterable[str] = IGNORED_FIELDS,
                       added: dict | None = None) -> dict[str, tuple]:
    """{field: (old value, new value)} for every field that differs, `ignore`d fields aside;
    a field only one side has shows "<absent>" on the other, except that a field of `added`
    (default ADDED_FIELDS) missing from `old` reads as its value there."""
    ignore = set(ignore)
    added = ADDED_FIELDS if added is None else added
    old = {**{k: v for k, v in added.items() if k in new}, **old}
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def listed_changes(changes: dict[str, tuple], most: int | None = None) -> str:
    """`config_differences`' result as "field: old -> new; ..." for a message (the first `most`, then how
    many more)."""
    shown = list(changes.items())[:most]
    more = f"; and {len(changes) - len(shown)} more" if len(shown) < len(changes) else ""
    return "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in shown) + more


def save_config(cfg, run_dir: str, *, allow_change: bool = False, ignore: Iterable[str] = IGNORED_FIELDS) -> None:
    """Write the dataclass `cfg` to run_dir/config.json, where a rerun finds it.

    A run directory holds one run: when config.json is already there (a resume, or a
    reused --run-dir) with a configuration that differs in any field but `ignore`d ones
    (where the run lives and how it is shown, IGNORED_FIELDS), this raises
    ConfigMismatchError naming each field with its saved and its new value, and writes
    nothing. Call it before training, so a mismatched rerun stops before it touches
    anything. `allow_change=True` overwrites config.json and appends `{"time",
    "changes": {field: [old, new]}}` to run_dir/config_changes.jsonl, so the directory
    still tells which configuration produced what. On several processes every process checks
    the file and process 0 writes it, after all have read it and before any returns.
    """
    from rljax.distributed import on_main

    path = os.path.join(run_dir, CONFIG_FILE)
    new = _jsonable(cfg)
    changes = {}
    old = read_before_rewrite(path)
    if old is not None:
        changes = config_differences(old, new, ignore)
        if changes and not allow_change:
            raise ConfigMismatchError(
                f"{path} holds another configuration ({listed_changes(changes)}). A run directory holds one run: "
                f"pass a new --run-dir, or rerun with the saved values, or --force-config to continue with the "
                f"new ones (recorded in {CONFIG_CHANGES_FILE})")
        if not changes:
            return  # the same run: keep the file as first written
    on_main(f"save_config: writing {path}", write_config, run_dir, new, changes)


def read_before_rewrite(path: str):
    """The JSON in `path` (None when there is no file), read by every process before a barrier: process 0
    may then rewrite the file, and every process has compared the same old contents (a process reading
    after the rewrite would see none of the changes, and skip the write's barrier). No barrier on one
    process."""
    from rljax.distributed import sync

    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    sync(f"{path} read")
    return old


def write_config(run_dir: str, record: dict, changes: dict[str, tuple] | None = None, *,
                 file: str = CONFIG_FILE, changes_file: str = CONFIG_CHANGES_FILE) -> None:
    """Write `record` to run_dir/<file> (config.json) atomically; `changes` ({field: (old, new)}, from
    `config_differences`) are appended to run_dir/<changes_file> (config_changes.jsonl) with the time,
    and said. A pipeline stage's arguments use the same record (`rljax.pipelines.run_stages`)."""
    from rljax.checkpoint import atomic_path

    path = os.path.join(run_dir, file)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
    if changes:
        with open(os.path.join(run_dir, changes_file), "a") as f:
            f.write(json.dumps({"time": time.time(), "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
        print(f"{path}: configuration changed ({', '.join(changes)}); recorded in {changes_file}")


def check_input_dir(path: str, flag: str, *, create: bool = False, create_flag: str | None = None) -> bool:
    """An input run directory (e.g. --sft-run-dir) must exist: a mistyped path is an error naming
    `flag` and the path, not a silent new run, unless `create` (the caller asked for one, with
    `create_flag`). Returns whether the directory exists."""
    if os.path.isdir(path):
        return True
    if not create:
        how = f"; pass {create_flag} to create it" if create_flag else ""
        raise FileNotFoundError(f"{flag}: no directory {path!r}{how}")
    return False


def make_run_dir(root: str, name: str) -> str:
    """A new directory `root/name-YYYYmmdd-HHMMSS` (suffixed if it exists). On several processes
    process 0 makes it and every process gets its path (`rljax.distributed.share_text`: their clocks
    differ, and the run is one directory on a file system they share); call it on every process."""
    from rljax.distributed import on_main, share_text

    def make() -> str:
        base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        path, i = base, 1
        while os.path.exists(path):
            path, i = f"{base}-{i}", i + 1
        os.makedirs(path)
        return path

    return share_text(on_main(f"make_run_dir: making a run directory in {root}", make))


def run(main: Callable[[T], Any], cls: type[T], argv: Sequence[str] | None = None, *,
        processes: bool = False) -> Any:
    """`main(parse_config(cls, argv))` for an experiment's `__main__`.

    Several processes (hosts): when the environment names them (RLJAX_COORDINATOR, RLJAX_NUM_PROCESSES,
    RLJAX_PROCESS_ID, or the JAX_* ones), or with RLJAX_DISTRIBUTED=auto in a job JAX recognises (a Cloud
    TPU pod, SLURM, Open MPI; `rljax.distributed.initialize`), every process runs the same command and
    they are connected before `main` starts. Only an experiment written for it
    (`processes=True`: a mesh over all their devices, `MeshFlags`, one writer per file) accepts that; the others
    exit with a message saying so, before anything runs.

    A preempted run (rljax.phases.Preempted) prints its one-line message to stderr, then how to resume
    (`resume_hint`: the same command when it named its --run-dir, else the command with --run-dir of the
    directory the run made), and exits with its exit_code (128 + signal: 143 for SIGTERM, 130 for SIGINT).
    The persistent compilation cache is on (`rljax.compile_cache`: a rerun loads its compiled programs
    instead of compiling them; RLJAX_COMPILATION_CACHE=off turns it off), and memory the compiler frees
    goes back to the OS (`rljax.host_memory`)."""
    from rljax import distributed
    from rljax.compile_cache import enable_compilation_cache
    from rljax.host_memory import release_compiler_memory
    from rljax.phases import Preempted

    cfg = parse_config(cls, argv)  # --help and a mistyped flag answer before any process connects
    if distributed.initialize() and not processes:
        import jax

        spec = getattr(sys.modules.get(getattr(main, "__module__", "")), "__spec__", None)
        name = spec.name if spec is not None else os.path.basename(sys.argv[0]) or "this experiment"
        raise SystemExit(f"{name}: runs on one process, but {jax.process_count()} were started and connected "
                         f"(rljax.distributed.initialize: the RLJAX_* / JAX_* coordinator variables, or "
                         f"RLJAX_DISTRIBUTED=auto); run it as one process, or use an experiment that "
                         f"takes several (experiments.grpo_math or experiments.r1_pipeline, with --mesh-data / "
                         f"--mesh-fsdp) or the library's phases and recipes with a mesh (docs/features.md)")
    enable_compilation_cache()
    release_compiler_memory()
    try:
        return main(cfg)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        hint = resume_hint(cfg, e.checkpoint_dir)
        if hint:
            print(hint, file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


def resume_hint(cfg, checkpoint_dir: str | None) -> str | None:
    """How to resume a study stopped with a checkpoint in `checkpoint_dir`: a study given --run-dir
    resumes when the same command runs again; one without made a new timestamped directory
    (`make_run_dir`), and the same command would make another and start over, so the hint names
    the run's directory (the nearest folder above the checkpoints holding the study's config.json)."""
    if checkpoint_dir is None:
        return None
    if getattr(cfg, "run_dir", None) or not hasattr(cfg, "run_dir"):
        return "rerun the same command to resume"
    d = os.path.dirname(os.path.normpath(checkpoint_dir))
    while not os.path.exists(os.path.join(d, CONFIG_FILE)) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    if not os.path.exists(os.path.join(d, CONFIG_FILE)):
        d = os.path.dirname(os.path.normpath(checkpoint_dir))
    return f"to resume, rerun the command with --run-dir {d} (without it a new run directory is made)"
