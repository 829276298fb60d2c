"""bench/soak.py, short: a storm of mixed requests against a tiny model; nothing lost or changed."""
import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_loses_and_changes_nothing(soak, capsys):
    t = time.perf_counter()
    code = soak.main(["--tiny", "--requests", "60", "--max-tokens", "10", "--concurrency", "32",
                      "--max-batch", "8", "--max-queue", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"\| \*\*all\*\* \| \d+ \| \| 0 \| 0 \| 0 \|", out) and "/health 200" in out
    assert time.perf_counter() - t < 20


def test_the_judge_flags_a_changed_answer_a_lost_request_and_a_wrong_status(soak):
    body = {"prompt": "Hi", "max_tokens": 4, "seed": 1, "tail": 4}
    key = ("Hi", soak.json.dumps(soak.settings(body).to_dict(), sort_keys=True))
    answers = {key: "abcd"}

    def case(**kw):
        c = soak.Case("valid", body, {200}, ["Hi"])
        for k, v in kw.items():
            setattr(c, k, v)
        return c
    assert soak.judge(case(status=200, texts=["abcd"]), answers) is None
    assert soak.judge(case(status=200, texts=["abce"]), answers) == "changed"
    assert soak.judge(case(error="ConnectError"), answers) == "lost"
    assert soak.judge(case(status=500), answers) == "failures"
    bad = soak.Case("hostile", b"{}", {400}, status=400, shape_ok=False)
    assert soak.judge(bad, answers) == "failures"
