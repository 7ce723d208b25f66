"""Adapters from Hugging Face `datasets` (or plain lists of dicts) to typed rows.

`load_records` turns a local JSON / JSONL / Parquet file or directory, a list of
dicts, an existing `datasets.Dataset` or a hub name into a `datasets.Dataset`.
The row schemas (`prompt_completion`, `chat_messages`, `preference_pairs`,
`scored_responses`, `binary_feedback`) read such a dataset into a plain list of
frozen, validated dataclasses; a bad row raises `DataError` naming the row index
(counted from 0) and the field, e.g. ``row 3: field 'chosen' is missing (columns with a value: prompt,
rejected)``; given a local file, the error names the file and its 1-based line instead,
``data.jsonl, line 4 (row 3, counted from 0): field 'chosen' is missing ...``. A local
JSON file that does not parse is one `DataError` naming the file, line and parse error.

`datasets` is imported inside the functions only, so this module imports where
it is not installed (install it with ``pip install 'rljax[data]'``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "load_records",
    "row_locator",
    "located",
    "PromptCompletion",
    "Message",
    "Chat",
    "PreferencePair",
    "ScoredResponse",
    "BinaryFeedback",
    "prompt_completion",
    "chat_messages",
    "chat_to_prompt_completion",
    "simple_template",
    "preference_pairs",
    "scored_responses",
    "binary_feedback",
    "RankedList",
    "StepLabelled",
    "Interaction",
    "ranked_lists",
    "step_labelled",
    "interaction_logs",
    "ROLES",
]

ROLES = ("system", "user", "assistant")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A row that does not fit its schema; the message names the row and the field."""


def _require_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rljax.data.adapters needs the 'datasets' package: pip install 'rljax[data]'"
        ) from e
    return datasets


# --------------------------------------------------------------------------- loading


def _looks_like_path(s: str) -> bool:
    """Whether a string that names nothing on disk was meant as a local path.

    Hub ids are "name" or "owner/name", so a single "/" alone does not make a path;
    an absolute path, "./", "../", "~", a data-file suffix, more than one "/",
    the platform separator (where it is not "/"), or "owner/name" whose "owner" is a
    folder here (data/train: a hub lookup of it would retry the network for ~20 s
    offline before failing) do.
    """
    if os.path.isabs(s) or s.startswith((".", "~")):
        return True
    if s.count("/") == 1 and os.path.isdir(s.split("/")[0]):
        return True
    if s.lower().endswith(tuple(_BUILDERS)):
        return True
    if os.sep != "/" and os.sep in s:
        return True
    return s.count("/") >= 2 or s.endswith("/")


# How `datasets.load_dataset(folder)` names a local folder's splits (`datasets.data_files`, with
# fsspec >= 2023.12): the first of these rules that matches any file decides, and files it does not
# match are left out, as there:
#   1. shards "data/<split>-00000-of-00001.<ext>" (any split name);
#   2. a folder named after a split keyword ("train/", "my_test/", "validation-2/" at any depth);
#   3. a file named after one ("train.jsonl", "test-00000.parquet", "my_dev.json");
#   4. otherwise every file is "train".
# A keyword counts where it stands alone between separators (start, end, or one of "-._ " and digits),
# so "trainer.json" is no split. Written out here, not imported, so JSON folders load without `datasets`.
_SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                   "test": ("test", "testing", "eval", "evaluation")}
_SHARD = re.compile(r"(?P<split>.+)-[0-9]{5}-of-[0-9]{5}.*\..*")
_SPLIT_NAME = re.compile(r"\w+(\.\w+)*")  # datasets' rule for a split name


def _keyword(word: str, *, folder: bool) -> re.Pattern:
    """A split keyword inside one path part: after the start or a separator, and before a separator
    (a folder's name may also end there; a file's name always goes on, to its suffix)."""
    return re.compile(rf"(?:^|[-._ 0-9]){re.escape(word)}(?:[-._ 0-9]{'|$' if folder else ''})")


_KEYWORDS_IN = {folder: {split: [_keyword(w, folder=folder) for w in words]
                          for split, words in _SPLIT_KEYWORDS.items()} for folder in (True, False)}


def _local_files(path: Path) -> list[Path]:
    """The .json / .jsonl / .parquet files under `path`, sorted, hidden ones and those in hidden or
    "__special__" folders left out (as `datasets` does)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS
                   and not any(part.startswith((".", "__")) for part in p.relative_to(path).parts[:-1])
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(
            f"no .json, .jsonl or .parquet files in directory {str(path)!r}")
    return files


def _folder_splits(folder: Path, text: str) -> dict[str, list[str]]:
    """{split: [file, ...]} of a local folder, by `datasets`' file-name conventions (the rules above),
    splits in datasets' order (train, validation, test, then others by name)."""
    files = [(str(f), f.relative_to(folder).parts) for f in _local_files(folder)]
    shards: dict[str, list[str]] = {}
    for f, parts in files:
        m = _SHARD.fullmatch(parts[-1]) if len(parts) == 2 and parts[0] == "data" else None
        if m is not None:
            shards.setdefault(m["split"], []).append(f)
    if shards:
        bad = sorted(s for s in shards if not _SPLIT_NAME.fullmatch(s))
        if bad:
            raise ValueError(f"directory {text!r}: shard file names in data/ give the split name(s) {bad}; a "
                             f"split name is letters, digits and '_' (with '.' between), e.g. "
                             f"data/train-00000-of-00001.parquet")
        order = [k for k in _SPLIT_KEYWORDS if k in shards] + sorted(set(shards) - set(_SPLIT_KEYWORDS))
        return {k: shards[k] for k in order}
    for folder_names in (True, False):  # rule 2 (folders), then rule 3 (file names)
        found = {}
        for split, keywords in _KEYWORDS_IN[folder_names].items():
            hits = [f for f, parts in files
                    if any(k.search(part) for k in keywords for part in (parts[:-1] if folder_names else parts[-1:]))]
            if hits:
                found[split] = hits
        if found:
            return found
    return {"train": [f for f, _ in files]}


def _resolve_files(path: Path, text: str, data_files, split: str) -> tuple[str, dict]:
    """(builder, {split: [file, ...]}) of a local file or directory (see `load_records`), the files of
    `split` only: a directory's split is chosen by `datasets`' file-name conventions (`_folder_splits`).
    A split with no files is a ValueError naming the directory and the splits it has."""
    if data_files is not None:
        files = data_files
    elif path.is_file():
        files = [str(path)]
    else:
        files = _folder_splits(path, text)
    if isinstance(files, (str, os.PathLike)):
        files = [os.fspath(files)]
    if isinstance(files, Mapping):
        files = {k: [os.fspath(v)] if isinstance(v, (str, os.PathLike)) else [os.fspath(f) for f in v]
                 for k, v in files.items()}
    else:
        files = {split: [os.fspath(f) for f in files]}
    if split not in files:
        where = f"directory {text!r}" if data_files is None else f"data_files for {text!r}"
        shown = ", ".join(f"{k!r} (" + ", ".join(os.path.relpath(f, path) if path.is_dir() else f for f in v[:3])
                          + (f", ... {len(v)} files)" if len(v) > 3 else ")") for k, v in files.items())
        raise ValueError(f"{where} has no {split!r} split, only {shown}. A split's files are named after it, as "
                         f"datasets.load_dataset reads a folder: {split}.jsonl, {split}/..., "
                         f"data/{split}-00000-of-00001.parquet (a folder whose files name no split is all 'train')")
    files = {split: files[split]}
    suffixes = {Path(f).suffix.lower() for f in files[split]}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if None in builders:
        raise ValueError(f"unsupported file type in {text!r}: {sorted(suffixes)} "
                         f"(expected .json, .jsonl or .parquet)")
    if len(builders) != 1:
        raise ValueError(f"mixed file types in {text!r}: {sorted(suffixes)}; use one format per directory")
    return builders.pop(), files


def _bad_json(file: str, line: int, err: json.JSONDecodeError | str) -> DataError:
    why = err if isinstance(err, str) else f"{err.msg} at column {err.colno}"
    return DataError(f"{file}, line {line}: {why}")


def _read_text(file: str) -> str:
    """The text of a local JSON / JSON Lines file, read as UTF-8 with a leading byte-order mark dropped
    (as `datasets` reads it; `json.loads` refuses one)."""
    with open(file, encoding="utf-8-sig") as f:
        return f.read()


def _json_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of JSON Lines `text`, blank lines included. A line ends at "\n" only (a
    "\r" before it is dropped): `str.splitlines` would also end one at U+2028, U+2029 or U+0085, which JSON
    allows unescaped inside a string (the control characters it also splits at, JSON does not)."""
    for n, line in enumerate(text.split("\n"), 1):
        yield n, line[:-1] if line.endswith("\r") else line


def _scan_lines(file: str, text: str) -> tuple[int, ...]:
    """The 1-based line numbers of the rows of JSON Lines `text` (lines as `_json_lines` splits them): every
    line that is not blank (`datasets` skips blank lines too) must be one JSON object, else DataError naming
    the line."""
    lines = []
    for n, line in _json_lines(text):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad_json(file, n, e) from None
        if not isinstance(value, dict):
            raise _bad_json(file, n, f"expected a JSON object (one row per line), got {type(value).__name__}")
        lines.append(n)
    return tuple(lines)


@functools.lru_cache(maxsize=32)
def _scan_json(file: str, mtime_ns: int, size: int) -> tuple[int, ...] | int | None:
    """Validate one local .json / .jsonl file and say where its rows are:

    - JSON Lines (any .jsonl; a .json that is not one JSON value): the tuple of the rows'
      1-based line numbers;
    - a .json holding one array of objects: its length (rows have no line of their own);
    - a .json holding one object (`datasets` reads its columns): None (rows unknown).

    A line (or file) that is not valid JSON raises one DataError naming the file, the
    line and the parse error, before `datasets` turns it into a long Arrow traceback.
    Cached by (path, mtime, size), so loading and locating a row read the file once.
    """
    del mtime_ns, size  # only part of the cache key
    text = _read_text(file)
    if file.lower().endswith(".json"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": a second value follows, i.e. JSON Lines
                raise _bad_json(file, e.lineno, e) from None
        else:
            if isinstance(whole, list):
                for k, row in enumerate(whole):
                    if not isinstance(row, dict):
                        raise DataError(f"{file}: element {k} (0-based) of the array is a "
                                        f"{type(row).__name__}, not a JSON object")
                return len(whole)
            if isinstance(whole, dict):
                return None
            raise DataError(f"{file}: expected a JSON array of objects or JSON Lines, got a {type(whole).__name__}")
    return _scan_lines(file, text)


def _json_rows(file: str):
    st = os.stat(file)
    return _scan_json(os.path.abspath(file), st.st_mtime_ns, st.st_size)


def _file_rows(file: str):
    """What `_scan_json` says for a JSON file; a Parquet file's row count from its footer."""
    if Path(file).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows
    return _json_rows(file)


def row_locator(source, *, split: str = "train", data_files=None) -> Callable[[int], str]:
    """Where row `i` (0-based, in `load_records(source, ...)` order) comes from, as text for errors:

    - a local JSON Lines file: ``"data.jsonl, line 4 (row 3, counted from 0)"`` (the 1-based line
      in the file, which differs from the row when there are blank lines);
    - a JSON array or Parquet file: ``"data.parquet, row 3 (counted from 0)"``;
    - a directory: the same, naming the file that holds the row;
    - anything else (a list, a `datasets.Dataset`, a hub name): ``"row 3"``.
    """
    plain = (lambda i: f"row {i}")
    if not isinstance(source, (str, os.PathLike)):
        return plain
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        return plain
    _, files = _resolve_files(path, os.fspath(source), data_files, split)
    found = [(f, _file_rows(f)) for f in files.get(split, [])]

    def locate(i: int) -> str:
        k = int(i)
        for file, rows in found:
            n = len(rows) if isinstance(rows, tuple) else rows
            if n is None:
                return f"row {i}"
            if k < n:
                if isinstance(rows, tuple):
                    return f"{file}, line {rows[k]} (row {i}, counted from 0)"
                return f"{file}, row {k} (counted from 0)"
            k -= n
        return f"row {i}"

    return locate


_ROW_PREFIX = re.compile(r"^row (\d+): ")


@contextlib.contextmanager
def located(source, **kw):
    """Re-raise a DataError that names a row ("row 3: ...", the adapters' format) with the row's
    place in `source` (`row_locator`: the file and its 1-based line), e.g.
    ``data.jsonl, line 5 (row 3, counted from 0): field 'chosen' is missing``."""
    try:
        yield
    except DataError as e:
        m = _ROW_PREFIX.match(str(e))
        if m is None or not isinstance(source, (str, os.PathLike)):
            raise
        where = row_locator(source, **kw)(int(m.group(1)))
        if where == f"row {m.group(1)}":
            raise
        raise DataError(f"{where}: {str(e)[m.end():]}") from e.__cause__  # (what the row's check chained)


def _locating(fn):
    """A schema function that names the file and line of a bad row when given a path."""
    @functools.wraps(fn)
    def wrapper(ds, *args, **kwargs):
        with located(ds):
            return fn(ds, *args, **kwargs)
    return wrapper


def load_records(source, *, split: str = "train", name: str | None = None, data_files=None,
                 cache_dir: str | os.PathLike | None = None):
    """A `datasets.Dataset` from `source`.

    source:
      - a `datasets.Dataset`: returned as is;
      - a list (or tuple) of dicts: `Dataset.from_list`;
      - a local .json / .jsonl / .parquet file, loaded as split `split`;
      - a directory holding such files: the files of split `split`, chosen by the names
        `datasets.load_dataset(directory, split=split)` goes by (hub-style shards
        data/train-00000-of-00001.parquet, folders train/ test/ validation/, files train.jsonl
        test.jsonl dev.json, ...; a directory whose files name no split is all "train", and where some
        do, the others are left out, as there; see `_folder_splits`), all of one builder ("json" for
        .json/.jsonl, "parquet" for .parquet);
        a split with no files is a ValueError naming the directory and the splits it has;
      - otherwise a hub name (or builder name), passed to
        ``datasets.load_dataset(source, name, split=split, data_files=data_files)``.

    A missing local path (absolute, relative with "./", ending in one of the
    suffixes, or "folder/name" under a folder that exists here, see `_looks_like_path`)
    raises FileNotFoundError naming it.
    Local JSON files are checked line by line first: a line that is not a JSON object
    raises one `DataError` naming the file, the 1-based line and the parse error
    (`datasets` would name neither the file nor the line); `row_locator` maps a row
    back to its file and line. `cache_dir` is passed to `datasets.load_dataset` for
    files and hub names.
    """
    datasets = _require_datasets()
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, (list, tuple)):
        return _from_list(datasets, source)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError(f"expected a datasets.Dataset (pick a split), got {type(source).__name__}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a path, hub name, list of dicts or datasets.Dataset, got {type(source).__name__}")

    text = os.fspath(source)
    path = Path(text).expanduser()
    kwargs = {} if cache_dir is None else {"cache_dir": os.fspath(cache_dir)}
    if path.exists():
        builder, files = _resolve_files(path, text, data_files, split)  # the split's files only
        if builder == "json":
            _check_json_files(files[split], text)
        return datasets.load_dataset(builder, data_files=files, split=split, **kwargs)
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"no such file or directory: {text!r}")
    if data_files is not None:
        kwargs["data_files"] = data_files
    return datasets.load_dataset(text, name, split=split, **kwargs)


def _from_list(datasets, rows: Sequence) -> Any:
    """A `datasets.Dataset` of a list of dicts with every column any row has, in first-seen order (a row
    without one reads None there; `Dataset.from_list` would keep only the first row's columns). A row that
    is not a dict, or whose value does not fit its column's type (Arrow holds one type a column), is a
    DataError naming the row and the column."""
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"row {i}: expected a dict, got {type(row).__name__}")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = {k: [row.get(k) for row in rows] for k in columns}
    try:
        return datasets.Dataset.from_dict(table)
    except (TypeError, ValueError) as e:  # pyarrow's ArrowTypeError, ArrowInvalid
        error = e
    for k, values in table.items():
        def fails(n: int) -> bool:  # whether the column's first n values do not make one Arrow column
            try:
                datasets.Dataset.from_dict({k: values[:n]})
            except (TypeError, ValueError):
                return True
            return False

        if not fails(len(values)):
            continue
        lo, hi = 1, len(values)  # the shortest failing prefix ends at the first value that does not fit
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fails(mid) else (mid + 1, hi)
        v = values[lo - 1]
        before = sorted({type(x).__name__ for x in values[:lo - 1] if x is not None})
        raise DataError(f"{_where(lo - 1, k)} is {type(v).__name__} {_show(v)}, but the rows before it hold "
                        f"{', '.join(before) or 'other values'} there; a column holds one type ({error})") from None
    raise error


def _check_json_files(files: Sequence[str], source: str) -> list:
    """Validate local JSON / JSON Lines files (`_json_rows`: a bad line is a DataError naming it);
    -> what `_json_rows` says of each. No rows in any of them is a DataError naming them, where
    `datasets` would stop with a bare StopIteration or a message naming no file."""
    found = [_json_rows(f) for f in files]
    if all(rows == () or rows == 0 for rows in found):
        raise DataError(f"{source}: no rows (no file holds a JSON object: empty, or only blank lines)"
                        if files else f"{source}: no .json / .jsonl files")
    return found


def _local_json_rows(source, split: str = "train") -> list | None:
    """The rows of split `split` of a local JSON / JSON Lines file (or directory of them, its split chosen
    as `load_records` does) as written, in `load_records`' order, or None for any other source (and a .json
    of columns). Read directly, not through `datasets`, whose JSON reader unifies a column's types (a column
    of "007" and 5 arrives as 7 and 5): a file then gives what the same list of dicts gives."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        return None
    builder, files = _resolve_files(path, os.fspath(source), None, split)
    if builder != "json":
        return None
    found = _check_json_files(files[split], os.fspath(source))
    if any(where is None for where in found):
        return None
    rows = []
    for file, where in zip(files[split], found):
        text = _read_text(file)
        if isinstance(where, tuple):  # JSON Lines
            rows.extend(json.loads(line) for _, line in _json_lines(text) if line.strip())
        else:  # one array of objects
            rows.extend(json.loads(text))
    return rows


def _rows(ds) -> Iterable[Mapping]:
    """Rows of a Dataset / list of dicts / anything `load_records` accepts (local JSON files read as
    written, `_local_json_rows`)."""
    if isinstance(ds, (list, tuple)):
        return ds  # validated row by row (no Arrow type unification of bad rows)
    rows = _local_json_rows(ds)
    if rows is not None:
        return rows
    try:
        datasets = _require_datasets()
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(ds, datasets.Dataset):
        return ds
    return load_records(ds)


# --------------------------------------------------------------------------- validation


def _where(row: int | None, field: str) -> str:
    return (f"row {row}: " if row is not None else "") + f"field {field!r}"


def _show(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _get(row_i: int, row: Any, field: str) -> Any:
    if not isinstance(row, Mapping):
        raise DataError(f"row {row_i}: expected a dict, got {type(row).__name__}")
    value = row.get(field)
    if value is None:
        # a datasets.Dataset fills a column a row lacks with None: there absent and null read the same
        present = ", ".join(str(k) for k, v in row.items() if v is not None)
        how = "is missing or null" if field in row else "is missing"
        raise DataError(f"{_where(row_i, field)} {how} (columns with a value: {present})")
    return value


def _check_str(value: Any, field: str, row: int | None, *, allow_empty: bool) -> str:
    if value is None:
        raise DataError(f"{_where(row, field)} is missing")
    if not isinstance(value, str):
        raise DataError(f"{_where(row, field)} must be a string, got {type(value).__name__} {_show(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{_where(row, field)} is empty")
    return value


def _check_number(value: Any, field: str, row: int | None) -> float:
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise DataError(f"{_where(row, field)} must be a number, got {type(value).__name__} {_show(value)}")
    out = float(value)
    if not math.isfinite(out):
        raise DataError(f"{_where(row, field)} must be finite, got {out}")
    return out


def _check_label(value: Any, field: str, row: int | None) -> bool:
    """A bool, or a real number equal to 0 or 1 (1.0 too: pandas stores an int column with a missing value as
    float64), as a bool; anything else is a DataError naming the row and field."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):  # (NaN is neither)
        return bool(value)
    raise DataError(f"{_where(row, field)} must be a bool or 0/1, got {type(value).__name__} {_show(value)}")


# --------------------------------------------------------------------------- row types


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str

    def __post_init__(self):
        _check_str(self.prompt, "prompt", None, allow_empty=True)
        _check_str(self.completion, "completion", None, allow_empty=False)


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str

    def __post_init__(self):
        _check_role(self.role, "role", None)
        _check_str(self.content, "content", None, allow_empty=True)


@dataclass(frozen=True)
class Chat:
    """A conversation that ends with the assistant message to learn."""

    messages: tuple[Message, ...]

    def __post_init__(self):
        if not isinstance(self.messages, tuple) or not all(isinstance(m, Message) for m in self.messages):
            raise DataError("field 'messages' must be a tuple of Message")
        _check_chat_end(self.messages, "messages", None)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str

    def __post_init__(self):
        _check_str(self.prompt, "prompt", None, allow_empty=True)
        _check_str(self.chosen, "chosen", None, allow_empty=False)
        _check_str(self.rejected, "rejected", None, allow_empty=False)


@dataclass(frozen=True)
class ScoredResponse:
    prompt: str
    response: str
    score: float

    def __post_init__(self):
        _check_str(self.prompt, "prompt", None, allow_empty=True)
        _check_str(self.response, "response", None, allow_empty=False)
        object.__setattr__(self, "score", _check_number(self.score, "score", None))


@dataclass(frozen=True)
class BinaryFeedback:
    prompt: str
    completion: str
    label: bool

    def __post_init__(self):
        _check_str(self.prompt, "prompt", None, allow_empty=True)
        _check_str(self.completion, "completion", None, allow_empty=False)
        object.__setattr__(self, "label", _check_label(self.label, "label", None))


def _check_role(value: Any, field: str, row: int | None) -> str:
    if value not in ROLES:
        raise DataError(f"{_where(row, field)} must be one of {', '.join(ROLES)}, got {_show(value)}")
    return value


def _check_chat_end(messages: Sequence[Message], field: str, row: int | None) -> None:
    if not messages:
        raise DataError(f"{_where(row, field)} is empty")
    last = messages[-1]
    if last.role != "assistant":
        raise DataError(f"{_where(row, field)}: the last message must be from the assistant, got {last.role!r}")
    if not last.content.strip():
        raise DataError(f"{_where(row, f'{field}[{len(messages) - 1}].content')} is empty "
                        f"(the last assistant message is the completion)")


# --------------------------------------------------------------------------- schemas


def _parse(ds, cls, spec) -> list:
    """One `cls(*values)` per row; spec: [(field, check(value, field, row) -> value), ...]."""
    return [cls(*(check(_get(i, row, field), field, i) for field, check in spec)) for i, row in enumerate(_rows(ds))]


_prompt = functools.partial(_check_str, allow_empty=True)
_text = functools.partial(_check_str, allow_empty=False)


@_locating
def prompt_completion(ds, *, prompt_field: str = "prompt", completion_field: str = "completion"
                      ) -> list[PromptCompletion]:
    """Rows {prompt: str (may be empty), completion: str (non-empty)}."""
    return _parse(ds, PromptCompletion, [(prompt_field, _prompt), (completion_field, _text)])


@_locating
def chat_messages(ds, *, field: str = "messages") -> list[Chat]:
    """Rows {messages: [{"role": system|user|assistant, "content": str}, ...]},
    the last message from the assistant with non-empty content."""
    out = []
    for i, row in enumerate(_rows(ds)):
        raw = _get(i, row, field)
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
            raise DataError(f"{_where(i, field)} must be a list of messages, got {type(raw).__name__} {_show(raw)}")
        messages = []
        for j, m in enumerate(raw):
            where = f"{field}[{j}]"
            if not isinstance(m, Mapping):
                raise DataError(f"{_where(i, where)} must be a dict with 'role' and 'content', "
                                f"got {type(m).__name__} {_show(m)}")
            if m.get("role") is None:
                raise DataError(f"{_where(i, where + '.role')} is missing")
            role = _check_role(m["role"], where + ".role", i)
            content = _check_str(m.get("content"), where + ".content", i, allow_empty=True)
            messages.append(Message(role, content))
        _check_chat_end(messages, field, i)
        out.append(Chat(tuple(messages)))
    return out


def simple_template(messages: Sequence[Message]) -> str:
    """The prompt for a reply after `messages`: "<role>: <content>\\n" each, then "assistant: "."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "


def chat_to_prompt_completion(chat: Chat, template: Callable[[Sequence[Message]], str] = simple_template
                              ) -> PromptCompletion:
    """All but the last message rendered by `template` as the prompt; the last
    (assistant) message's content as the completion."""
    if not isinstance(chat, Chat):
        chat = Chat(tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in chat))
    return PromptCompletion(template(chat.messages[:-1]), chat.messages[-1].content)


@_locating
def preference_pairs(ds, *, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected") -> list[PreferencePair]:
    """Rows {prompt: str, chosen: str (non-empty), rejected: str (non-empty, not the chosen text)}."""
    pairs = _parse(ds, PreferencePair, [(prompt_field, _prompt), (chosen_field, _text), (rejected_field, _text)])
    for i, pair in enumerate(pairs):
        if pair.chosen == pair.rejected:  # found here, before anything trains, not in the batch that holds it
            raise DataError(f"row {i}: fields {chosen_field!r} and {rejected_field!r} are the same text, so the pair "
                            "says nothing")
    return pairs


@_locating
def scored_responses(ds, *, prompt_field: str = "prompt", response_field: str = "response",
                     score_field: str = "score") -> list[ScoredResponse]:
    """Rows {prompt: str, response: str (non-empty), score: int | float (not bool, finite)}."""
    return _parse(ds, ScoredResponse, [(prompt_field, _prompt), (response_field, _text),
                                       (score_field, _check_number)])


@_locating
def binary_feedback(ds, *, prompt_field: str = "prompt", completion_field: str = "completion",
                    label_field: str = "label") -> list[BinaryFeedback]:
    """Rows {prompt: str, completion: str (non-empty), label: bool or 0/1}."""
    return _parse(ds, BinaryFeedback, [(prompt_field, _prompt), (completion_field, _text),
                                       (label_field, _check_label)])


# --------------------------------------------------------------------------- reward-model shapes


def _check_list(value: Any, field: str, row: int | None) -> list:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DataError(f"{_where(row, field)} must be a list, got {type(value).__name__} {_show(value)}")
    return list(value)


@dataclass(frozen=True)
class RankedList:
    """K answers to one prompt with ranks (0 = best, equal = tie); at least two answers, not all tied."""

    prompt: str
    answers: tuple[str, ...]
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class StepLabelled:
    """A solution as a list of steps with one label in [0, 1] per step (floats: soft labels stay soft;
    None: the step is unlabelled)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[float | None, ...]


@dataclass(frozen=True)
class Interaction:
    """One logged display of a completion with the signals users left (None where not logged):
    like / accept / click (bool), position (display rank, 1 = top), propensity (P(examined) at
    that position, in (0, 1]), dwell_seconds (>= 0)."""

    prompt: str
    completion: str
    like: bool | None = None
    accept: bool | None = None
    click: bool | None = None
    position: int | None = None
    propensity: float | None = None
    dwell_seconds: float | None = None


@_locating
def ranked_lists(ds, *, prompt_field: str = "prompt", answers_field: str = "answers",
                 ranks_field: str = "ranks") -> list[RankedList]:
    """Rows {prompt: str, answers: [str, ...] (non-empty), ranks: [int >= 0, ...]} of equal
    length, at least two answers and two distinct ranks (an empty or all-tied ranking is an error)."""
    out = []
    for i, row in enumerate(_rows(ds)):
        prompt = _check_str(_get(i, row, prompt_field), prompt_field, i, allow_empty=True)
        answers = _check_list(_get(i, row, answers_field), answers_field, i)
        ranks = _check_list(_get(i, row, ranks_field), ranks_field, i)
        answers = [_check_str(a, f"{answers_field}[{k}]", i, allow_empty=False) for k, a in enumerate(answers)]
        for k, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
                raise DataError(f"{_where(i, f'{ranks_field}[{k}]')} must be an integer >= 0, got {_show(r)}")
        if len(ranks) != len(answers):
            raise DataError(f"{_where(i, ranks_field)} has {len(ranks)} ranks for {len(answers)} answers")
        if len(answers) < 2 or len(set(ranks)) < 2:
            raise DataError(f"{_where(i, ranks_field)}: a ranking needs two answers with different ranks, "
                            f"got {_show(ranks)}")
        out.append(RankedList(prompt, tuple(answers), tuple(int(r) for r in ranks)))
    return out


@_locating
def step_labelled(ds, *, prompt_field: str = "prompt", steps_field: str = "steps",
                  labels_field: str = "labels") -> list[StepLabelled]:
    """Rows {prompt: str, steps: [str, ...] (non-empty), labels: [number in [0, 1] or None, ...]} with one
    label per step; None leaves the step unlabelled (PRM800K-style data: the steps after the first error;
    `collate_steps` keeps it out of the loss)."""
    out = []
    for i, row in enumerate(_rows(ds)):
        prompt = _check_str(_get(i, row, prompt_field), prompt_field, i, allow_empty=True)
        steps = _check_list(_get(i, row, steps_field), steps_field, i)
        labels = _check_list(_get(i, row, labels_field), labels_field, i)
        if not steps:
            raise DataError(f"{_where(i, steps_field)} is empty (a solution needs at least one step)")
        steps = [_check_str(s, f"{steps_field}[{k}]", i, allow_empty=False) for k, s in enumerate(steps)]
        if len(labels) != len(steps):
            raise DataError(f"{_where(i, labels_field)} has {len(labels)} labels for {len(steps)} steps")
        values = []
        for k, v in enumerate(labels):
            if v is None:
                values.append(None)
                continue
            v = _check_number(v, f"{labels_field}[{k}]", i)
            if not 0.0 <= v <= 1.0:
                raise DataError(f"{_where(i, f'{labels_field}[{k}]')} must be in [0, 1], got {v}")
            values.append(v)
        out.append(StepLabelled(prompt, tuple(steps), tuple(values)))
    return out


@_locating
def interaction_logs(ds, *, prompt_field: str = "prompt", completion_field: str = "completion",
                     like_field: str = "like", accept_field: str = "accept", click_field: str = "click",
                     position_field: str = "position", propensity_field: str = "propensity",
                     dwell_field: str = "dwell_seconds") -> list[Interaction]:
    """Rows {prompt, completion} plus any of the signals (missing or null = not logged):
    like / accept / click (bool or 0/1), position (int >= 1), propensity (in (0, 1]),
    dwell_seconds (>= 0). A row with no signal at all is an error naming it."""
    out = []
    for i, row in enumerate(_rows(ds)):
        prompt = _check_str(_get(i, row, prompt_field), prompt_field, i, allow_empty=True)
        completion = _check_str(_get(i, row, completion_field), completion_field, i, allow_empty=False)
        got = {}
        for name, f in (("like", like_field), ("accept", accept_field), ("click", click_field)):
            if row.get(f) is not None:
                got[name] = _check_label(row[f], f, i)
        if row.get(position_field) is not None:
            pos = row[position_field]
            if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or pos < 1:
                raise DataError(f"{_where(i, position_field)} must be an integer >= 1, got {_show(pos)}")
            got["position"] = int(pos)
        if row.get(propensity_field) is not None:
            p = _check_number(row[propensity_field], propensity_field, i)
            if not 0.0 < p <= 1.0:
                raise DataError(f"{_where(i, propensity_field)} must be in (0, 1], got {p}")
            got["propensity"] = p
        if row.get(dwell_field) is not None:
            d = _check_number(row[dwell_field], dwell_field, i)
            if d < 0:
                raise DataError(f"{_where(i, dwell_field)} must be >= 0, got {d}")
            got["dwell_seconds"] = d
        if not any(k in got for k in ("like", "accept", "click", "dwell_seconds")):
            raise DataError(f"row {i}: no signal logged (none of {like_field}, {accept_field}, {click_field}, "
                            f"{dwell_field})")
        out.append(Interaction(prompt, completion, **got))
    return out
