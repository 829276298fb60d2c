"""The streaming data step (train/data.py, train/corpus.py): the same shards as the earlier
non-streaming step (datasets.map over an arrow cache) byte for byte, shards that decode back to
the source documents, and a killed run that leaves nothing taken as complete."""
import json
import subprocess
import sys

import numpy as np
import pytest

from train import data as data_mod
from train.config import config_from

EOS = data_mod.EOS


def reference_shards(cfg):
    """What the earlier data step made, re-done here with `datasets` the way it did it: load
    (arrow cache), group, filter, first max_docs, train_test_split(seed), BPE on the training
    split in its order, encode + EOS per document, concatenated in split order."""
    import datasets
    builder, kwargs = data_mod.resolve_source(cfg)
    ds = datasets.load_dataset(builder, split="train", **kwargs)
    field = cfg.text_field if builder != "text" else "text"
    if cfg.group_by:
        docs, key, cur = [], None, []
        for row in ds:
            k = tuple(row[g] for g in cfg.group_by)
            if k != key and cur:
                docs.append(cfg.group_sep.join(cur))
                cur = []
            key = k
            cur.append(row[field])
        docs.append(cfg.group_sep.join(cur))
    else:
        docs = list(ds[field])
    ds = datasets.Dataset.from_dict({"text": [d for d in docs if d and d.strip()]})
    if cfg.max_docs is not None:
        ds = ds.select(range(min(cfg.max_docs, len(ds))))
    split = ds.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed, shuffle=True)
    tok = data_mod.train_bpe(split["train"]["text"], cfg.bpe_vocab_size)
    eos = tok.token_to_id(EOS)
    out = {}
    for name, part in (("train", split["train"]), ("val", split["test"])):
        out[name] = np.array([t for e in tok.encode_batch(part["text"]) for t in e.ids + [eos]], dtype=np.uint16)
    return tok, out, split


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus of verses with book/chapter fields (grouped into documents), blank rows,
    non-ASCII text."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["In", "the", "beginning", "God", "créa", "λόγος", "and", "light", "was", "naïve", "waters"]
    rows = []
    for chapter in range(60):
        for verse in range(int(rng.integers(1, 6))):
            text = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
            rows.append({"book": "Gen" if chapter < 30 else "Exo", "chapter": chapter, "verse": verse,
                         "text": text if rng.random() > 0.05 else "   "})
    path = d / "verses.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def cfg_for(corpus, tmp_path, **kw):
    base = {"dataset": str(corpus), "data_dir": str(tmp_path / "data"), "val_fraction": 0.1, "seed": 3,
            "bpe_vocab_size": 300, "num_proc": 2, "tokenizer": "bpe"}
    return config_from(None, {**base, **kw})


@pytest.mark.parametrize("kw", [
    {"group_by": ["book", "chapter"], "group_sep": " "},
    {"group_by": [], "max_docs": 150},
    {"group_by": ["book", "chapter"], "num_proc": 1, "seed": 11, "val_fraction": 0.25},
], ids=["grouped", "verses, max_docs", "one thread, other seed"])
def test_shards_are_byte_identical_to_the_earlier_data_step(corpus, tmp_path, kw):
    cfg = cfg_for(corpus, tmp_path, **kw)
    d = data_mod.prepare(cfg, progress=False)
    sh = data_mod.TokenShards(d)
    tok, ref, split = reference_shards(cfg)
    assert sh.tokenizer().to_str() == tok.to_str()
    assert sh.train.tobytes() == ref["train"].tobytes() and sh.val.tobytes() == ref["val"].tobytes()
    assert sh.meta["train_docs"] == len(split["train"]) and sh.meta["val_docs"] == len(split["test"])
    assert sorted(p.name for p in d.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert not list(d.parent.glob("*.tmp*"))


def test_shards_decode_back_to_the_source_documents(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path, group_by=["book", "chapter"])
    sh = data_mod.TokenShards(data_mod.prepare(cfg, progress=False))
    tok, eos = sh.tokenizer(), sh.meta["eos_token_id"]
    docs = list(data_mod.iter_documents(cfg))
    train_idx, val_idx = data_mod.split_order(len(docs), cfg)
    for shard, order in ((sh.train, train_idx), (sh.val, val_idx)):
        ids = np.asarray(shard)
        assert ids[-1] == eos
        cuts = np.flatnonzero(ids == eos)
        pieces = np.split(ids, cuts + 1)[:-1]  # every document ends in its EOS
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == [docs[i] for i in order]
    assert data_mod.validation_documents(cfg) == [docs[i] for i in val_idx]


def test_a_killed_data_step_is_not_taken_as_complete_and_a_rerun_finishes(corpus, tmp_path, monkeypatch):
    cfg = cfg_for(corpus, tmp_path, group_by=["book", "chapter"])
    out = data_mod.data_dir_for(cfg, "bpe")
    dead = out.with_name(out.name + ".tmp999999999")  # a scratch dir of a process that is gone
    dead.mkdir(parents=True)
    (dead / "train.bin").write_bytes(b"junk")
    real_gather = data_mod._gather

    def killed(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(data_mod, "_gather", killed)
    with pytest.raises(KeyboardInterrupt):
        data_mod.prepare(cfg, progress=False)
    assert not out.exists()  # nothing marked complete
    monkeypatch.setattr(data_mod, "_gather", real_gather)
    d = data_mod.prepare(cfg, progress=False)
    assert (d / "meta.json").exists() and not dead.exists() and not list(d.parent.glob("*.tmp*"))
    _, ref, _ = reference_shards(cfg)
    assert data_mod.TokenShards(d).train.tobytes() == ref["train"].tobytes()


def test_the_data_step_command(corpus, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"dataset": str(corpus), "data_dir": str(tmp_path / "d"), "bpe_vocab_size": 300,
                                    "group_by": ["book", "chapter"]}))
    p = subprocess.run([sys.executable, "-m", "train.data", "--config", str(cfg_file), "--num_proc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"data: {tmp_path / 'd'}") and "train" in p.stdout
    p = subprocess.run([sys.executable, "-m", "train.data", "--config", str(cfg_file), "--dataset", str(tmp_path / "x.txt"),
                        "--data_dir", str(tmp_path / "d2")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "corpus file not found" in p.stderr
