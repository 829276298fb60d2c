import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from rich.console import Console

import tmfast.cli as cli
from tmfast import GenerationConfig, MaturationEngine, load_checkpoint
from tmfast.testing import byte_tokenizer, tiny_model
from tmfast.checkpoint import save_checkpoint
from tmfast.cli import main
from tmfast.cli_view import Tick, render_table
from tmfast.engine import Engine


def tiny_checkpoint(tmp_path_factory, name: str, n_positions: int) -> str:
    tok = byte_tokenizer()
    path = tmp_path_factory.mktemp("ck") / name
    save_checkpoint(tiny_model(vocab_size=tok.get_vocab_size(), n_positions=n_positions), path, tokenizer=tok)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "tiny", 64)


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


def test_show_tail_draws_every_step_on_stderr(ckpt, capsys):
    """Not a terminal: one plain view line per step on stderr, so stdout stays the result (JSON
    lines stay JSON lines)."""
    code, out, err = run(["generate", "Hi", "--checkpoint", ckpt, "--max-new-tokens", "5", "--tail", "3",
                          "--show-tail"], capsys)
    steps = [line for line in err.splitlines() if line.startswith("[")]
    assert code == 0 and len(steps) == 5 and all("⟨" in s for s in steps)
    assert not any(line.startswith("[") for line in out.splitlines())
    code, out, err = run(["generate", "Hi", "--checkpoint", ckpt, "--max-new-tokens", "5", "--tail", "3",
                          "--show-tail", "--json"], capsys)
    assert code == 0 and len([json.loads(line) for line in out.splitlines()]) == 1


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


# -- issue 11: the CLI as people use it ---------------------------------------------------------


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Context 128: room for the default max_new_tokens (64) and K=16."""
    return tiny_checkpoint(tmp_path_factory, "wide", 128)


def run_any(args, capsys):
    """main(args) → (exit code, stdout, stderr), argparse's SystemExit included."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("tmfast: error: ") and "Traceback" not in err


def prompts_file(tmp_path, lines, name="prompts.txt"):
    f = tmp_path / name
    f.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(f)


class FailOn(Engine):
    """An engine where requests whose prompt is "BAD" end in error (as a non-finite front would)."""
    def add_request(self, prompt, *args, **kw):
        rid = super().add_request(prompt, *args, **kw)
        self.bad = getattr(self, "bad", set()) | ({rid} if prompt == "BAD" else set())
        return rid

    def step(self):
        events = super().step()
        for ev in events:
            if ev.request_id in getattr(self, "bad", ()) and ev.finished:
                ev.finish_reason, ev.error = "error", "GenerationError: boom"
        return events


def test_a_request_that_ends_in_error_is_an_error_not_text(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(cli, "Engine", FailOn)
    code, out, err = run_any(["generate", "BAD", "--checkpoint", ckpt, "--max-new-tokens", "4"], capsys)
    assert code == 1 and out == "" and one_line_error(err) and "boom" in err
    code, out, err = run_any(["generate", "BAD", "--checkpoint", ckpt, "--max-new-tokens", "4", "--json"], capsys)
    row = json.loads(out)
    assert code == 1 and row["finish_reason"] == "error" and "boom" in row["error"] and one_line_error(err)


def test_an_error_in_a_batch_file_keeps_what_came_before_and_stops(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "Engine", FailOn)
    lines = [f"prompt {i}" for i in range(5)] + ["BAD"] + [f"later {i}" for i in range(20)]
    f = prompts_file(tmp_path, lines)
    args = ["generate", "--batch-file", f, "--checkpoint", ckpt, "--max-new-tokens", "4", "--max-batch", "3"]
    code, out, err = run_any(args, capsys)
    assert code == 1 and out.startswith("prompt 0") and all(f"prompt {i}" in out for i in range(5))
    assert "BAD" not in out and "later" not in out
    assert one_line_error(err) and "line 6: generation failed" in err
    code, out, err = run_any(args + ["--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [r["index"] for r in rows] == list(range(6)) and rows[-1]["finish_reason"] == "error"


def test_non_finite_weights_never_print_text_and_exit_0(tmp_path, capsys):
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size(), n_positions=64)
    with torch.no_grad():
        model.vector_head.weight.fill_(float("nan"))
    save_checkpoint(model, tmp_path / "nan", tokenizer=tok)
    code, out, err = run_any(["generate", "hi", "--checkpoint", str(tmp_path / "nan"), "--max-new-tokens", "4"],
                             capsys)
    # exit 1 (the generation fails) — or 2, if the checkpoint loader refuses non-finite weights
    assert code in (1, 2) and out == "" and one_line_error(err)


def test_issue_11_reproduction_tail_noise_1e30_is_never_silent(ckpt, capsys):
    code, out, err = run_any(["generate", "x", "--checkpoint", ckpt, "--tail-noise", "1e30", "--alpha-max", "0.5",
                              "--max-new-tokens", "8"], capsys)
    assert code in (1, 2) and out == "" and one_line_error(err) and "tail_noise" in err


@pytest.mark.parametrize("device", ["bogus", "cuda:0", "cpu:x"])
def test_an_unusable_device_is_a_one_line_error(ckpt, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    for cmd in (["generate", "hi"], ["serve"]):
        code, out, err = run_any(cmd + ["--checkpoint", ckpt, "--device", device], capsys)
        assert code == 2 and out == "" and one_line_error(err) and "--device" in err, err


def test_length_and_generation_defaults_come_from_generation_config(wide_ckpt, capsys):
    args = cli.build_parser().parse_args(["generate", "x"])
    d = GenerationConfig()
    assert cli._gen_config(args) == d
    code, out, _ = run_any(["generate", "Hello", "--checkpoint", wide_ckpt, "--json"], capsys)
    assert code == 0 and len(json.loads(out)["token_ids"]) == d.max_new_tokens == 64


def test_help_shows_every_default(capsys):
    d = GenerationConfig()
    code, out, _ = run_any(["generate", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    for flag, value in [("--max-new-tokens", d.max_new_tokens), ("--tail", d.tail), ("--guidance", d.guidance),
                        ("--alpha-max", d.alpha_max), ("--embryo-scale", d.embryo_scale),
                        ("--history-noise", d.history_noise), ("--tail-noise", d.tail_noise), ("--seed", d.seed),
                        ("--max-batch", cli.GENERATE_MAX_BATCH), ("--device", "cpu")]:
        help_of = flat.split(f" {flag} ", 2)[-1]
        assert re.match(rf"\S*\s.*?\(default: {re.escape(str(value))}\)", help_of), (flag, help_of[:120])
    code, out, _ = run_any(["serve", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    assert all(s in flat for s in ["(default: 8000)", "(default: 16)", "(default: 64)", "(default: 10.0)"])
    # serve batches as generate does (it used to default to 8 while the README passed 32)
    assert re.search(rf"--max-batch N .*?\(default: {cli.GENERATE_MAX_BATCH}\)", flat)


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--max-new-tokens", "abc"], "--max-new-tokens"),
    (["generate", "hi", "--tail", "1.5"], "--tail"),
    (["generate", "hi", "--max-batch", "0"], "--max-batch"),
    (["generate", "hi", "--seed", "-1"], "seed"),
    (["generate", "hi", "--alpha-max", "2"], "alpha_max"),
    (["generate", "hi", "--tail", "40"], "k_max"),
    (["generate", "hi", "--stop", ""], "stop"),
    (["generate"], "give a prompt or --batch-file"),
    (["generate", "   "], "prompt is empty"),
    (["serve", "--max-batch", "0"], "--max-batch"),
    (["serve", "--max-queue", "-1"], "--max-queue"),
    (["serve", "--k-window", "0"], "--k-window"),
    (["serve", "--k-window", "99"], "k_max=16"),
    (["serve", "--port", "70000"], "--port"),
])
def test_user_mistakes_are_one_line_errors_with_exit_2(ckpt, capsys, args, message):
    code, out, err = run_any(args + ["--checkpoint", ckpt], capsys)
    assert code == 2 and out == "" and one_line_error(err) and message in err, err


def test_batch_file_mistakes_name_the_line_before_anything_runs(ckpt, tmp_path, capsys):
    cases = [
        (prompts_file(tmp_path, ["", "   ", ""], "blank.txt"), "has no prompts"),
        (prompts_file(tmp_path, ["fine", "", "x" * 80, "fine"], "long.txt"), "line 3: "),
    ]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    cases.append((str(bad), "not UTF-8"))
    for f, message in cases:
        code, out, err = run_any(["generate", "--batch-file", f, "--checkpoint", ckpt, "--max-new-tokens", "4"],
                                 capsys)
        assert code == 2 and out == "" and one_line_error(err) and message in err, err


def test_a_directory_that_is_not_a_checkpoint(tmp_path, ckpt, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (corrupt / name).write_bytes((Path(ckpt) / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00not safetensors at all")
    for d in (empty, corrupt):
        code, out, err = run_any(["generate", "hi", "--checkpoint", str(d)], capsys)
        assert code == 2 and out == "" and one_line_error(err), err


class CountingStdout(io.StringIO):
    """stdout that records, at its first write, how many prompts the engine had been given."""
    def __init__(self, engines):
        super().__init__()
        self.engines, self.added_at_first_write = engines, None

    def write(self, s):
        if self.added_at_first_write is None and s:
            self.added_at_first_write = self.engines[-1].added
        return super().write(s)


def test_batch_file_streams_through_the_engine_in_order(ckpt, tmp_path, capsys, monkeypatch):
    """300 prompts: results equal MaturationEngine.generate with the same (shared) seed, come out in
    input order, start before most prompts were read, and the engine never holds more than max_batch."""
    engines = []

    class Spy(Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.added, self.most = 0, 0
            engines.append(self)

        def add_request(self, *a, **kw):
            self.added += 1
            return super().add_request(*a, **kw)

        def step(self):
            self.most = max(self.most, self.num_running + self.num_queued)
            return super().step()

    monkeypatch.setattr(cli, "Engine", Spy)
    words = ["In", "the", "beginning", "God", "and", "it", "came", "to", "pass", "Jesus", "said"]
    prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 4)) + f" {i}" for i in range(300)]
    f = prompts_file(tmp_path, prompts[:150] + [""] + prompts[150:])
    stdout = CountingStdout(engines)
    monkeypatch.setattr(sys, "stdout", stdout)
    code = main(["generate", "--batch-file", f, "--checkpoint", ckpt, "--json", "--max-new-tokens", "4",
                 "--tail", "4", "--seed", "3", "--max-batch", "8"])
    rows = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert code == 0 and [r["index"] for r in rows] == list(range(300)) and [r["prompt"] for r in rows] == prompts
    assert rows[150]["line"] == 152  # the blank line 151 is skipped
    spy = engines[-1]
    assert spy.max_batch == 8 and spy.most <= 8
    assert stdout.added_at_first_write <= 4 * 8  # the first result printed before most prompts were read
    model, tok = load_checkpoint(ckpt)
    ref = MaturationEngine(model, tok).generate(prompts, GenerationConfig(max_new_tokens=4, tail=4, seed=3))
    assert [r["token_ids"] for r in rows] == [r.token_ids for r in ref]
    assert [r["text"] for r in rows] == [r.text for r in ref]
    assert len({tuple(r["token_ids"]) for r in rows}) > 10  # diverse, so the comparison means something


def test_stream_results_reads_prompts_lazily(ckpt):
    model, tok = load_checkpoint(ckpt)
    engine = Engine(model, tok, max_batch=4, max_queue=4, k_window=4)
    consumed = []

    def prompts():
        for i in range(1000):
            consumed.append(i)
            yield f"p{i}"

    gen = GenerationConfig(max_new_tokens=3, tail=4)
    stream = cli.stream_results(engine, prompts(), gen, read_ahead=10)
    first = [next(stream) for _ in range(3)]
    assert [r.index for r in first] == [0, 1, 2] and len(consumed) <= 10 + 1
    stream.close()  # leaves nothing running
    assert not engine.has_work or all(ev.finish_reason == "abort" for ev in engine.step())
    assert not engine.has_work


def test_progress_goes_to_stderr_only_when_asked_or_on_a_terminal(ckpt, tmp_path, capsys):
    f = prompts_file(tmp_path, [f"line {i}" for i in range(6)])
    base = ["generate", "--batch-file", f, "--checkpoint", ckpt, "--max-new-tokens", "3", "--json"]
    code, out_plain, err = run_any(base, capsys)  # captured stderr is not a terminal
    assert code == 0 and err == "" and [json.loads(r)["index"] for r in out_plain.splitlines()] == list(range(6))
    code, out, err = run_any(base + ["--progress"], capsys)
    assert code == 0 and out == out_plain and "6/6" in err and "prompts" in err
    code, out, err = run_any(base + ["--no-progress"], capsys)
    assert code == 0 and out == out_plain and err == ""


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_live_view_redraws_in_place_and_keeps_results(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "10")
    f = prompts_file(tmp_path, [f"prompt number {i}" for i in range(12)])
    args = ["generate", "--batch-file", f, "--checkpoint", ckpt, "--max-new-tokens", "5", "--tail", "3",
            "--max-batch", "6"]
    code, expected, _ = run_any(args, capsys)
    tty = TTY()
    monkeypatch.setattr(sys, "stdout", tty)
    assert main(args + ["--show-tail"]) == 0
    shown = tty.getvalue()
    assert "\x1b[H\x1b[J" not in shown and "\x1b[2J" not in shown  # no whole-screen clears
    assert "\x1b[1A" in shown  # the view moves the cursor back up over itself
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).replace("\r\n", "\n")
    results = [line for line in expected.splitlines()]
    assert all(r in plain for r in results)


def test_the_live_table_fits_the_terminal():
    rows = [Tick(i, "a long prompt " * 5, 100 + i, "with a much longer committed text ✓ 汉字\n" * 4,
                 ["' the'", "'\\n'", "'汉'"] * 6, False) for i in range(30)]
    for width, height in [(40, 8), (80, 24), (25, 5)]:
        console = Console(file=io.StringIO(), width=width, height=height, color_system=None)
        console.print(render_table(rows, "status " * 30, width, height))
        lines = console.file.getvalue().splitlines()
        assert len(lines) <= height - 1 and max(cell_len(line) for line in lines) <= width
        assert "more running" in lines[-1]
        # the newest text is what shows, cropped from the left
        assert any(line.rstrip().endswith("汉字⏎") or "…" in line for line in lines[2:])
    few = Console(file=io.StringIO(), width=80, height=24, color_system=None)
    few.print(render_table(rows[:3], "ok", 80, 24))
    assert len(few.file.getvalue().splitlines()) == 2 + 3


def test_interrupt_exits_130_and_keeps_what_was_printed(ckpt, tmp_path, capsys, monkeypatch):
    class Interrupted(Engine):
        steps = 0

        def step(self):
            Interrupted.steps += 1
            if Interrupted.steps > 12:
                raise KeyboardInterrupt
            return super().step()

    monkeypatch.setattr(cli, "Engine", Interrupted)
    f = prompts_file(tmp_path, [f"p {i}" for i in range(40)])
    code, out, err = run_any(["generate", "--batch-file", f, "--checkpoint", ckpt, "--max-new-tokens", "3",
                              "--max-batch", "2", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 130 and err == "tmfast: interrupted\n"
    assert 0 < len(rows) < 40 and [r["index"] for r in rows] == list(range(len(rows)))
