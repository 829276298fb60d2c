import json
import os
import subprocess
import sys

import pytest
import torch

from tmfast.testing import byte_tokenizer, tiny_model
from tmfast.checkpoint import save_checkpoint
from tmfast.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tok = byte_tokenizer()
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(tiny_model(vocab_size=tok.get_vocab_size(), n_positions=64), path, tokenizer=tok)
    return str(path)


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_prompt_and_continuation(ckpt, capsys):
    code, out, err = run(["generate", "Hello", "--checkpoint", ckpt, "--max-new-tokens", "8", "--tail", "4"],
                         capsys)
    assert code == 0 and out.startswith("Hello") and len(out) > len("Hello\n")
    code2, out2, _ = run(["generate", "Hello", "--checkpoint", ckpt, "--max-new-tokens", "8", "--tail", "4"],
                         capsys)
    assert out2 == out  # same seed, same text


def test_json_and_batch_file(ckpt, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("First prompt\n\nSecond one\n")
    code, out, _ = run(["generate", "--batch-file", str(f), "--checkpoint", ckpt, "--json",
                        "--max-new-tokens", "6", "--guidance", "2"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["First prompt", "Second one"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in rows)


def test_noise_flags_reach_the_engine(ckpt, capsys):
    base = ["generate", "Hello", "--checkpoint", ckpt, "--max-new-tokens", "12", "--tail", "4", "--json"]
    plain = json.loads(run(base, capsys)[1])["token_ids"]
    noisy = [json.loads(run(base + flags, capsys)[1])["token_ids"]
             for flags in (["--tail-noise", "2"], ["--history-noise", "2"])]
    assert all(n != plain for n in noisy)
    assert json.loads(run(base + ["--tail-noise", "2"], capsys)[1])["token_ids"] == noisy[0]  # seeded


def test_show_tail_draws_every_step(ckpt, capsys):
    code, out, _ = run(["generate", "Hi", "--checkpoint", ckpt, "--max-new-tokens", "5", "--tail", "3",
                        "--show-tail"], capsys)
    steps = [line for line in out.splitlines() if line.startswith("[")]
    assert code == 0 and len(steps) == 5 and all("⟨" in s for s in steps)


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "prompt is empty"),
    (["generate", "hi", "--tail", "0"], "tail length K must be"),
    (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "x" * 80], "does not fit the model context"),
    (["generate", "hi", "--max-new-tokens", "100"], "at most"),
    (["generate", "--batch-file", "/nonexistent/prompts.txt"], "batch file not found"),
    (["generate", "hi", "--batch-file", "/nonexistent/prompts.txt"], "not both"),
    (["generate", "hi", "--tail-noise", "-0.1"], "tail_noise must be"),
    (["generate", "hi", "--history-noise", "-1"], "history_noise must be"),
])
def test_bad_input_is_a_one_line_error(ckpt, capsys, args, message):
    code, out, err = run(args + ["--checkpoint", ckpt], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tmfast: error:") and message in err


def test_unknown_checkpoint_dir(capsys):
    code, _, err = run(["generate", "hi", "--checkpoint", "/nonexistent/ck"], capsys)
    assert code == 2 and err.count("\n") == 1 and "checkpoint directory not found" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "abc"])
def test_non_finite_guidance(ckpt, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--checkpoint", ckpt, "--guidance", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--guidance" in err and "Traceback" not in err


def test_console_script_end_to_end(ckpt):
    r = subprocess.run([sys.executable, "-m", "tmfast.cli", "generate", "The", "--checkpoint", ckpt,
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("The"), r.stderr
    r = subprocess.run([sys.executable, "-m", "tmfast.cli", "generate", "", "--checkpoint", ckpt],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "tmfast: error: prompt is empty"


def test_forced_triton_without_a_gpu_is_a_one_line_error(ckpt):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so Triton can run: this case is about machines without one")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for kernel tests
    r = subprocess.run([sys.executable, "-m", "tmfast.cli", "generate", "hi", "--checkpoint", ckpt,
                        "--impl", "triton", "--max-new-tokens", "4"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("tmfast: error:") and "impl='triton'" in r.stderr
