"""The official `openai` client against a live server on loopback (a tiny random model)."""
import openai
import pytest

from tmfast.engine import Engine
from test_server import Served, make_model, post, server, slowed, tok, wait_until  # noqa: F401  shared fixtures


@pytest.fixture(scope="module")
def live(server):
    return server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tok):
    from tmfast import GenerationConfig, MaturationEngine
    eng = MaturationEngine(make_model(tok), tok)

    def answer(prompt, max_tokens, seed=0, tail=16, stop=()):
        return eng.generate([prompt], GenerationConfig(max_new_tokens=max_tokens, seed=seed, tail=tail,
                                                       stop=tuple(stop)))[0].text
    return answer


def test_completion(client, reference):
    out = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=9, seed=3,
                                    temperature=0.0, top_p=1.0, extra_body={"tail": 4})
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.choices[0].text == reference("In the beginning", 9, seed=3, tail=4)
    assert out.choices[0].finish_reason == "length" and out.choices[0].index == 0
    assert out.usage.prompt_tokens == 16 and out.usage.completion_tokens == 9 and out.usage.total_tokens == 25


def test_completion_with_openai_default_values(client, reference):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, n=1, best_of=1, echo=False,
                                    logprobs=None, presence_penalty=0, frequency_penalty=0, logit_bias={},
                                    suffix=None, user="me", stop=None)
    assert out.choices[0].text == reference("Hello", 5)


def test_several_prompts(client, reference):
    out = client.completions.create(model="tiny", prompt=["Hello", "Hi there"], max_tokens=4, seed=1)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [reference(p, 4, seed=1) for p in ("Hello", "Hi there")]


def test_streaming_with_usage(client, reference):
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, seed=1, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference("Hello", 12, seed=1)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == 5


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "tmfast"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("kwargs, param, words", [
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_tokens": 500}, "max_tokens", "new tokens fit"),
    ({"extra_body": {"tail": 17}}, "tail", "tail"),
    ({"logprobs": 3}, "logprobs", "log-probabilities"),
    ({"echo": True}, "echo", "echo"),
    ({"presence_penalty": 1.0}, "presence_penalty", "penalties"),
    ({"seed": 2 ** 64}, "seed", "seed"),
    ({"extra_body": {"guidance": 1e30, "alpha_max": 0.5}}, "guidance", "guidance"),
])
def test_errors_are_bad_request_errors_with_the_message(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="Hello", **kwargs)
    err = info.value
    assert err.status_code == 400 and words in err.message
    assert err.body["param"] == param and err.body["type"] == "invalid_request_error"


def test_a_prompt_over_the_context_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="word " * 100, max_tokens=2)
    assert info.value.body["param"] == "prompt" and "context" in info.value.message


def test_a_full_queue_is_a_rate_limit_error(tok):
    from concurrent.futures import ThreadPoolExecutor
    s = Served(slowed(Engine(make_model(tok), tok, max_batch=1, k_window=4, max_queue=0), 0.02))
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=30)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the one slot busy, no waiting allowed
            first = pool.submit(post, s.url, {"prompt": "long", "max_tokens": 40, "tail": 4})
            assert wait_until(lambda: s.engine.num_running == 1, 5)
            with pytest.raises(openai.RateLimitError) as info:
                c.completions.create(model="tiny", prompt="Hello", max_tokens=2, extra_body={"tail": 4})
            assert info.value.response.headers["retry-after"]
            assert first.result().status_code == 200
    finally:
        s.close()
