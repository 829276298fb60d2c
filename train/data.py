"""The data step: any text source → a tokenizer and uint16/uint32 memmap shards (the nanoGPT pattern).

    python -m train.data --config CFG [--num_proc N] [--key=value ...]   # the data step alone
    (python -m train runs the same step first, and reuses what it made)

    data/<name>-<hash>/
        tokenizer.json   the tokenizer the shards were made with
        train.bin        token ids, documents separated by <|endoftext|>
        val.bin
        meta.json        dtype, counts, source (written last: its presence marks the shards complete)

The documents are read as a stream (train/corpus.py: no cache of the source, memory independent
of the corpus), tokenised in batches over num_proc threads of the tokenizer, and written as they
come into one file in corpus order; then each shard is gathered from it in the split's seeded
order and the scratch file deleted: on disk this leaves the shards (2 bytes a token with uint16)
and the tokenizer. Everything is made in data/<name>-<hash>.tmp<pid>/ and renamed into place at
the end, so a killed run leaves nothing a later run takes as complete (a later run deletes it).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .corpus import (DataError, count_documents, iter_documents, kjv_path, resolve_source,  # noqa: F401
                     split_order, validation_documents)

EOS = "<|endoftext|>"
ENCODE_BATCH = 256  # documents per encode call: the tokenizer's peak memory grows with the batch


# ------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------
def train_bpe(texts, vocab_size: int, length: int | None = None):
    """A byte-level BPE (GPT-2 style) trained on the corpus, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=length)
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


def _stale_tmp_dirs(out: Path) -> list[Path]:
    """Scratch directories of data steps that died (their process is gone)."""
    stale = []
    for d in out.parent.glob(out.name + ".tmp*"):
        pid = d.name.rsplit(".tmp", 1)[1]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            stale.append(d)
        except PermissionError:  # alive, another user's
            pass
    return stale


def _batches(it, size: int):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_all(cfg, tokenizer, eos: int, dtype, n_docs: int, path: Path, progress: bool) -> np.ndarray:
    """Tokenise every document in corpus order into `path` (ids + EOS each); returns the
    documents' offsets (n_docs + 1) into it."""
    from tqdm import tqdm
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    parallel = cfg.num_proc > 1
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read per call
    n, t0 = 0, time.perf_counter()
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # ids only: no offsets kept
    try:
        with open(path, "wb") as f, tqdm(total=n_docs, unit="doc", desc="tokenising", disable=not progress,
                                         file=sys.stderr, dynamic_ncols=True) as bar:
            for texts in _batches(iter_documents(cfg), ENCODE_BATCH):
                encs = encode(texts)
                lens = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
                flat = np.empty(int(lens.sum()), dtype=dtype)
                ends = np.cumsum(lens)
                for e, end, ln in zip(encs, ends, lens):
                    flat[end - ln:end - 1] = e.ids
                flat[ends - 1] = eos
                f.write(flat.tobytes())
                if n + len(encs) > n_docs:
                    raise DataError("the corpus changed while it was being read (more documents than counted)")
                offsets[n + 1:n + 1 + len(encs)] = offsets[n] + ends
                n += len(encs)
                bar.update(len(encs))
                bar.set_postfix_str(f"{offsets[n] / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f} M tokens/s")
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    if n != n_docs:
        raise DataError(f"the corpus changed while it was being read ({n} documents, counted {n_docs})")
    return offsets


def _gather(scratch: Path, offsets: np.ndarray, order: np.ndarray, path: Path, dtype) -> tuple[int, int]:
    """Write the documents `order` names, in that order, from the scratch file into path:
    (tokens, docs). Plain reads and writes, not memmaps: mapped pages would count as the
    process's memory and grow with the corpus."""
    size = np.dtype(dtype).itemsize
    starts, ends = offsets[order], offsets[order + 1]
    buf, pending = [], 0
    with open(scratch, "rb") as src, open(path, "wb") as dst:
        fd = src.fileno()
        for a, b in zip(starts.tolist(), ends.tolist()):
            buf.append(os.pread(fd, (b - a) * size, a * size))
            pending += b - a
            if pending >= 1 << 22:  # flush every ~4 M tokens
                dst.write(b"".join(buf))
                buf, pending = [], 0
        dst.write(b"".join(buf))
    return int((ends - starts).sum()), len(order)


def prepare(cfg, tokenizer=None, tokenizer_spec: str = "bpe", progress: bool | None = None) -> Path:
    """Tokenise the corpus into data_dir (once; later calls reuse it). Returns data_dir.

    tokenizer: a fixed tokenizer (from the checkpoint or GPT-2 we start from); None →
    cfg.tokenizer decides ("bpe": train one on the training split; "gpt2"; or a path).
    progress: a progress bar on stderr (default: when stderr is a terminal).
    """
    out = data_dir_for(cfg, tokenizer_spec)
    fp = _fingerprint(cfg, tokenizer_spec)
    if (out / "meta.json").exists():
        have = json.loads((out / "meta.json").read_text()).get("fingerprint")
        if have is not None and have != fp:
            raise DataError(f"data_dir {out} holds shards made from other data settings or another "
                            f"tokenizer (fingerprint {have} != {fp}); delete it or choose another data_dir")
        return out
    import shutil
    for d in _stale_tmp_dirs(out):  # what a killed data step left
        shutil.rmtree(d, ignore_errors=True)
    progress = sys.stderr.isatty() if progress is None else progress
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, cfg.num_proc)))  # the tokenizer's threads
    n_docs = count_documents(cfg)
    train_idx, val_idx = split_order(n_docs, cfg)
    if tokenizer is None:
        if cfg.tokenizer == "bpe":
            held_out = np.zeros(n_docs, dtype=bool)
            held_out[val_idx] = True
            train_texts = (d for i, d in enumerate(iter_documents(cfg)) if not held_out[i])
            tokenizer = train_bpe(train_texts, cfg.bpe_vocab_size, length=len(train_idx))
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

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"dataset": cfg.dataset, "vocab_size": vocab, "eos_token_id": eos, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer_spec, "fingerprint": fp}
    scratch = tmp / "corpus_order.bin"
    offsets = _encode_all(cfg, tokenizer, eos, dtype, n_docs, scratch, progress)
    for name, order in (("train", train_idx), ("val", val_idx)):
        meta[f"{name}_tokens"], meta[f"{name}_docs"] = _gather(scratch, offsets, order, tmp / f"{name}.bin", dtype)
    scratch.unlink()
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process won the race: use its copy
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


def main(argv: list[str] | None = None) -> int:
    """`python -m train.data --config CFG [--num_proc N] [--key=value ...]`: the data step alone,
    with the tokenizer the training run would use (init_from's, or cfg.tokenizer)."""
    from tmfast.checkpoint import CheckpointError
    from tmfast.config import ConfigError
    from .config import parse_args
    from .trainer import _initial_tokenizer
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[1])
        return 0
    try:
        cfg, _, _ = parse_args(argv)
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, cfg.num_proc)))  # before the tokenizer's pool starts
        init_tok = _initial_tokenizer(cfg)
        spec = cfg.tokenizer if init_tok is None else tokenizer_spec(init_tok)
        t0 = time.perf_counter()
        out = prepare(cfg, init_tok, spec)
        meta = json.loads((out / "meta.json").read_text())
        print(f"data: {out} — {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
              f"({meta['train_docs']:,} / {meta['val_docs']:,} documents), {time.perf_counter() - t0:.1f} s")
        return 0
    except (ConfigError, CheckpointError) as e:  # ConfigError includes DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was marked complete; a rerun starts over", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
