"""The evaluation layer (evals): AR decoding against tmfast.ar, judge scores, a tiny end-to-end run."""
import json

import pytest
import torch

from evals import EvalError
from evals.cli import main
from evals.judges import TmfastJudge
from evals.prompts import prompts_from_documents
from evals.table import markdown_table
from evals.traces import record_traces
from tmfast.testing import byte_tokenizer, tiny_model
from tmfast import GenerationConfig, save_checkpoint
from tmfast.ar import _nucleus_pick, ar_decode, ar_generate, ar_nll


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def ar_model():
    m = tiny_model(vocab_size=257, eos_token_id=0, seed=3)
    with torch.no_grad():  # make the AR head less self-repeating than a bare random model
        g = torch.Generator().manual_seed(1)
        for b in m.blocks:
            b.mlp.c_proj.weight.add_(torch.randn(b.mlp.c_proj.weight.shape, generator=g) * 0.3)
    return m


PROMPTS = ["hello world", "abc", "The quick brown fox"]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_cached_batched_greedy_equals_ar_generate(ar_model, tok, penalty):
    ids = [tok.encode(p).ids for p in PROMPTS]
    ref = [r.token_ids for r in ar_generate(ar_model, tok, ids, max_new_tokens=20, repetition_penalty=penalty,
                                            stop_at_eos=False)]
    assert ar_decode(ar_model, ids, 20, repetition_penalty=penalty, batch_size=2) == ref


def test_repetition_penalty_changes_something(ar_model, tok):
    ids = [tok.encode(p).ids for p in PROMPTS]
    assert ar_decode(ar_model, ids, 20) != ar_decode(ar_model, ids, 20, repetition_penalty=1.3)


def test_nucleus_is_seeded_per_sample(ar_model, tok):
    ids = [tok.encode(p).ids for p in PROMPTS]
    a = ar_decode(ar_model, ids, 16, top_p=0.9, seeds=[1, 2, 3])
    assert a == ar_decode(ar_model, ids, 16, top_p=0.9, seeds=[1, 2, 3], batch_size=1)
    assert a[1:] == ar_decode(ar_model, ids[1:], 16, top_p=0.9, seeds=[2, 3])
    assert ar_decode(ar_model, ids, 16, top_p=0.9, seeds=[4, 5, 6]) != a
    # a vanishing nucleus is greedy
    assert ar_decode(ar_model, ids, 16, top_p=1e-6, seeds=[1, 2, 3]) == ar_decode(ar_model, ids, 16)


def test_nucleus_pick_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(_nucleus_pick(logits, 0.8, 1.0, torch.tensor([u / 100]))) for u in range(100)}
    assert picks == {0, 1}
    picks = {int(_nucleus_pick(logits, 1.0, 1.0, torch.tensor([u / 100]))) for u in range(100)}
    assert picks == {0, 1, 2, 3}


def test_judge_matches_ar_nll(ar_model, tok):
    ids = [tok.encode(p).ids for p in PROMPTS]
    conts = ar_decode(ar_model, ids, 10, top_p=0.9, seeds=[1, 2, 3])
    got = TmfastJudge(ar_model, tok, "x").nll(list(zip(ids, conts)), batch_size=2)
    for (s, n), p, c in zip(got, ids, conts):
        rs, rn = ar_nll(ar_model, p, c)
        assert n == rn and s == pytest.approx(rs, rel=1e-4, abs=1e-4)


def test_prompts_from_documents(tok):
    docs = ["a" * 10, "In the beginning God created the heaven and the earth. " * 4, "xyz " * 20]
    ps = prompts_from_documents(docs, tok, 4, 8, 6, seed=0)
    assert len(ps) == 4 and all(len(p.ids) == 8 and len(p.reference) == 6 for p in ps)
    assert [p.ids for p in ps] == [p.ids for p in prompts_from_documents(docs, tok, 4, 8, 6, seed=0)]
    with pytest.raises(EvalError):
        prompts_from_documents(docs, tok, 2, 200, 10, seed=0)


def test_traces_index_positions_by_stage(tok):
    m = tiny_model(vocab_size=257, eos_token_id=0)
    K = 4
    g = GenerationConfig(max_new_tokens=10, tail=K, guidance=2.0, alpha_max=0.5, seed=0, stop_at_eos=False)
    data = record_traces(m, tok, [tok.encode("In the").ids], [g], [1.0])
    run = data["runs"][0]
    assert len(run["steps"]) == 10 and len(run["steps"][0]["tail_tokens"]) == K
    pos = run["by_position"]
    assert [p["q"] for p in pos] == list(range(K - 1, 10))
    for p in pos:  # the last stage's top-1 is what was committed
        assert p["top1"][-1] == p["committed"] == run["committed"][p["q"]]
        assert all(0 <= e <= data["log_vocab"] + 1e-4 for e in p["entropy"]["1.0"])


def test_end_to_end_tiny(tmp_path, tok, capsys):
    save_checkpoint(tiny_model(vocab_size=257, eos_token_id=0, seed=0), tmp_path / "mat", tok)
    save_checkpoint(tiny_model(vocab_size=257, eos_token_id=0, seed=1), tmp_path / "ar", tok)
    (tmp_path / "prompts.txt").write_text("In the beginning\n\nAnd God said\n")
    argv = ["--maturation", str(tmp_path / "mat"), "--ar", str(tmp_path / "ar"), "--prompts",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "8", "--tails", "4", "64", "--guidance", "1", "2",
            "--alpha-max", "1", "0.5", "--best-of", "3",
            "--maturation-row", '{"name": "noisy", "tail": 4, "alpha_max": 0.7, "tail_noise": 0.5, "history_noise": 0.5}',
            "--out", str(tmp_path / "out"), "--traces", "1",
            "--trace-tail", "4", "--trace-tau", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "quality.json").read_text())  # --out is a directory
    names = [m["name"] for m in doc["methods"]]
    assert names[:4] == ["AR greedy", "AR greedy + rep. penalty 1.2", "AR nucleus p=0.9", "AR best-of-3 (judge rerank)"]
    assert len(names) == 4 + 2 * 2 * 2 + 2 and names[-1] == "noisy" and "engine defaults" in names[-2]
    noisy, plain = doc["methods"][-1], [m for m in doc["methods"] if m["name"] == "maturation K=4 s=1 α_max=0.5"][0]
    assert noisy["settings"]["tail_noise"] == 0.5 and plain["settings"]["tail_noise"] == 0.0
    assert [x["token_ids"] for x in noisy["samples"]] != [x["token_ids"] for x in plain["samples"]]
    for m in doc["methods"]:
        if "K=64" in m["name"]:
            assert m["skipped"] and "k_max" in m["skipped"]
            continue
        assert m["skipped"] is None and len(m["samples"]) == 2
        assert all(len(s["token_ids"]) == 8 for s in m["samples"])
        assert m["metrics"]["judge_ppl"] > 1 and 0 < m["metrics"]["dist1"] <= 1
    assert (tmp_path / "out" / "quality.md").read_text().strip() in first.strip()
    assert list((tmp_path / "out" / "traces").iterdir())
    for name in ("entropy.png", "flicker.png", "displacement.png", "traces.json"):
        assert (tmp_path / "out" / "traces" / name).stat().st_size > 0
    assert main(argv[:-6] + ["--traces", "0"]) == 0  # the same seed gives the same table
    assert capsys.readouterr().out == first


def test_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["--maturation", str(tmp_path / "nope"), "--ar", "none", "--prompts", "x.txt"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("row", ['[1]', '{"tail": 0}', '{"bogus": 1}', '{"seed": 3}', 'nope'])
def test_bad_maturation_row_is_one_line_error(tmp_path, capsys, row):
    save_checkpoint(tiny_model(vocab_size=257, eos_token_id=0, seed=0), tmp_path / "mat", byte_tokenizer())
    (tmp_path / "p.txt").write_text("In the beginning\n")
    assert main(["--maturation", str(tmp_path / "mat"), "--ar", "none", "--judge", "none", "--prompts",
                 str(tmp_path / "p.txt"), "--max-new-tokens", "4", "--tails", "1", "--guidance", "1",
                 "--alpha-max", "1", "--maturation-row", row, "--out", "", "--traces", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_markdown_table_marks_skipped():
    from evals.quality import MethodResult
    t = markdown_table([MethodResult("a", "ar", {}, metrics={"dist1": 0.5}), MethodResult("b", "maturation", {},
                                                                                          skipped="why")])
    assert "| a | 0.500 |" in t and "| b | — |" in t and "skipped (why)" in t


def test_reference_row_has_every_column(tok):
    from evals import metrics
    from evals.prompts import Prompt
    from evals.quality import QualitySettings, evaluate
    from evals.table import COLUMNS
    refs = ["and the earth was without form", "and void and darkness was upon"]
    prompts = [Prompt(tok.encode(t).ids, t, tok.encode(" " + r).ids) for t, r in zip(PROMPTS, refs)]
    rows = evaluate(None, tok, None, None, None, prompts, QualitySettings(max_new_tokens=8), log=lambda s: None)
    assert [r.name for r in rows] == ["reference (validation text)"]
    m = rows[0].metrics
    assert {k for k, _, _ in COLUMNS} - {"judge_ppl"} <= {k for k, v in m.items() if v is not None}  # CS too
    assert m["rep2_cs"] == metrics.contrastive_search_measures([r.split() for r in refs])["rep2_cs"] == 0.0
    assert m["diversity_cs"] == 1.0 and "judge_ppl" not in m  # no judge


def test_run_maturation_takes_explicit_settings_and_ignores_batching(tok):
    from evals.prompts import Prompt
    from evals.quality import run_maturation, sample_seed
    from tmfast.config import mix_seed
    assert sample_seed(5, 3, 2) == mix_seed(5, 3, 2) and sample_seed(5, 3) == mix_seed(5, 3, 0)
    m = tiny_model(vocab_size=257, eos_token_id=0)
    prompts = [Prompt(tok.encode(p).ids, p) for p in PROMPTS]
    row = {"tail": 4, "tail_noise": 0.3}
    a = run_maturation(m, tok, prompts, row, max_new_tokens=6, seed=1, batch_size=3)
    assert a == run_maturation(m, tok, prompts, row, max_new_tokens=6, seed=1, batch_size=2)
    assert all(len(s) == 6 for s in a)


def test_bad_option_is_one_line_error(capsys):
    assert main(["--num-prompts", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tmfast-eval: error:")


def test_validation_split_is_the_one_training_shards(tmp_path, tok):
    """evals re-makes the validation documents with train.data's split: exactly what val.bin holds."""
    import numpy as np

    from evals.prompts import checkpoint_validation_documents
    from train.config import config_from
    from train.data import TokenShards, prepare, validation_documents
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i}: in the beginning {'x' * (i % 7)}\n" for i in range(40)))
    cfg = config_from(None, {"dataset": str(corpus), "data_dir": str(tmp_path / "data"), "val_fraction": 0.25,
                             "num_proc": 1, "seed": 7})
    shards = TokenShards(prepare(cfg, tok, "bytes"))
    docs = validation_documents(cfg)
    assert len(docs) == 10
    assert np.asarray(shards.val).tolist() == [t for d in docs for t in tok.encode(d).ids + [0]]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    assert checkpoint_validation_documents(tmp_path / "ckpt") == docs
    with pytest.raises(EvalError):
        checkpoint_validation_documents(tmp_path)


def test_the_evaluation_runs_in_bfloat16_and_says_when_a_device_is_missing(tmp_path, tok, capsys):
    save_checkpoint(tiny_model(vocab_size=257, eos_token_id=0, seed=0), tmp_path / "mat", tok)
    save_checkpoint(tiny_model(vocab_size=257, eos_token_id=0, seed=1), tmp_path / "ar", tok)
    (tmp_path / "prompts.txt").write_text("In the beginning\nAnd God said\n")
    argv = ["--maturation", str(tmp_path / "mat"), "--ar", str(tmp_path / "ar"), "--prompts",
            str(tmp_path / "prompts.txt"), "--max-new-tokens", "6", "--tails", "4", "--guidance", "1",
            "--alpha-max", "1", "--best-of", "2", "--out", str(tmp_path / "out"), "--traces", "0"]
    assert main(argv + ["--device", "cpu", "--dtype", "bfloat16", "--progress"]) == 0
    doc = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert doc["settings"]["dtype"] == "bfloat16"
    assert all(m["skipped"] is None and m["metrics"]["judge_ppl"] > 1 for m in doc["methods"])
    assert "methods" in capsys.readouterr().err  # the progress bar
    assert main(argv + ["--device", "nonsense"]) == 2
    assert "--device nonsense" in capsys.readouterr().err


def test_the_hugging_face_judge_scores_in_batches_as_it_does_one_by_one(tmp_path):
    """Right-padded batches with an attention mask give each pair the NLL it gets alone."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from evals.judges import HFJudge
    tok = byte_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "hf")
    pairs = [("In the beginning", " God created"), ("And", " it came to pass that"), ("x", ""),
             ("Blessed are the meek, for", " they")]
    batched = HFJudge(str(tmp_path / "hf"), batch_size=4).nll_text(pairs)
    alone = HFJudge(str(tmp_path / "hf"), batch_size=1).nll_text(pairs)
    assert [n for _, n in batched] == [n for _, n in alone] and batched[2] == (0.0, 0)
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(batched, alone))
