"""The data step's cost: wall time, tokens/s, peak RSS and disk per token, on local JSONL corpora.

    python bench/data_step.py --sizes 30 60 120 --out bench/results/data_step
    python bench/data_step.py --sizes 60 --other /tmp/before      # + the data step of another checkout

Each corpus is KJV verses (the shipped corpus) drawn at random, with replacement, into documents
of 5–60 verses, written as JSONL ({"text": …}) until it reaches the size; tokenised with the
shipped tokenizer (tmfast/assets/maturation/tokenizer.json), --num-proc processes/threads. Every
run is a fresh process (`python -m train.data`, or for --other its `train.data.prepare`) with its
own empty Hugging Face datasets cache, so "disk beyond the source" counts the shards, the
tokenizer and every cache the step leaves behind; peak RSS is the child's maximum resident set.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tmfast" / "assets" / "maturation" / "tokenizer.json"


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    sys.path.insert(0, str(ROOT))
    from train.corpus import kjv_path
    verses = [json.loads(line)["text"] for line in kjv_path().open()]
    rng = random.Random(seed)
    target, size, docs = int(megabytes * 1e6), 0, 0
    with path.open("w") as f:
        while size < target:
            line = json.dumps({"text": " ".join(rng.choices(verses, k=rng.randint(5, 60)))}) + "\n"
            f.write(line)
            size += len(line.encode())
            docs += 1
    return docs


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run_step(checkout: Path, corpus: Path, work: Path, num_proc: int, new: bool) -> dict:
    cache = work / "hf_cache"
    data = work / "data"
    cfg = {"dataset": str(corpus), "data_dir": str(data), "tokenizer": str(TOKENIZER), "num_proc": num_proc,
           "val_fraction": 0.02, "seed": 0}
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HOME": str(work / "hf_home"),
           "PYTHONPATH": str(checkout)}
    if new:
        (work / "cfg.json").write_text(json.dumps(cfg))
        cmd = [sys.executable, "-m", "train.data", "--config", str(work / "cfg.json")]
    else:
        code = ("import json, sys; from train.config import config_from; from train.data import prepare; "
                f"prepare(config_from(None, json.loads({json.dumps(json.dumps(cfg))})), None, 'file')")
        cmd = [sys.executable, "-c", code]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
    peak = usage.ru_maxrss  # KiB on Linux
    meta = json.loads((data / "meta.json").read_text())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "peak_rss_mb": peak / 1024,
            "disk_bytes": du(data) + du(cache), "cache_bytes": du(cache),
            "bytes_per_token": (du(data) + du(cache)) / tokens, "shards_sha": _sha(data)}


def _sha(data: Path) -> str:
    import hashlib
    h = hashlib.sha1()
    for name in ("train.bin", "val.bin"):
        h.update((data / name).read_bytes())
    return h.hexdigest()[:12]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[30, 60, 120], help="corpus sizes, MB")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--other", default=None, help="another checkout: its data step too (same corpora)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_step_") as tmp:
        tmp = Path(tmp)
        for mb in args.sizes:
            corpus = tmp / f"corpus_{mb:g}mb.jsonl"
            docs = make_corpus(corpus, mb)
            for label, checkout, new in [("this", ROOT, True)] + ([("other", Path(args.other), False)]
                                                                   if args.other else []):
                work = tmp / f"work_{label}_{mb:g}"
                work.mkdir()
                r = run_step(checkout, corpus, work, args.num_proc, new)
                r.update(corpus_mb=corpus.stat().st_size / 1e6, docs=docs, checkout=label)
                rows.append(r)
                print(f"{label} {mb:g} MB: {r['tokens'] / 1e6:.1f} M tokens in {r['wall_s']:.1f} s "
                      f"({r['tokens_per_s'] / 1e6:.2f} M tokens/s), peak RSS {r['peak_rss_mb']:.0f} MB, "
                      f"{r['bytes_per_token']:.2f} bytes of disk per token beyond the source "
                      f"(caches {r['cache_bytes'] / 1e6:.0f} MB), shards {r['shards_sha']}", flush=True)
                shutil.rmtree(work)
    lines = [f"`python bench/data_step.py {' '.join(sys.argv[1:] if argv is None else argv)}` "
             f"(num_proc {args.num_proc}; shipped tokenizer; KJV verses in documents of 5–60 verses)", "",
             "| checkout | corpus MB | documents | tokens | wall s | M tokens/s | peak RSS MB | disk bytes / token "
             "beyond the source | of which caches MB | shards sha1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkout']} | {r['corpus_mb']:.0f} | {r['docs']:,} | {r['tokens']:,} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s'] / 1e6:.2f} | {r['peak_rss_mb']:.0f} | {r['bytes_per_token']:.2f} | "
                     f"{r['cache_bytes'] / 1e6:.0f} | {r['shards_sha']} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")
        Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
