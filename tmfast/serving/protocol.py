"""What a client sends and gets back: the request schema, the one error shape, request → settings.

OpenAI's /v1/completions fields are all accepted at their default values (clients send them);
a value that asks for something tmfast cannot do (log-probabilities, echo, penalties, a suffix,
logit bias, n > 1) is a 400 naming the field. Every error, whatever raised it, has one shape:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.responses import JSONResponse

from ..config import ConfigError, GenerationConfig, unicode_error

# API field ← GenerationConfig / engine field, so errors name what the client sent
API_NAMES = {"max_new_tokens": "max_tokens"}
# the error code when the raiser names none
DEFAULT_CODES = {400: "invalid_value", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
                 429: "queue_full", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    """An HTTP error in the one shape; raised anywhere in a handler, rendered by the app."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.code, self.headers = code or DEFAULT_CODES.get(status), headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> "AsciiJSONResponse":
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def api_name(param: str | None) -> str | None:
    return API_NAMES.get(param, param)


def api_message(message: str) -> str:
    """An engine or config message in the API's words (max_tokens, not max_new_tokens)."""
    for ours, theirs in API_NAMES.items():
        message = message.replace(ours, theirs)
    return message


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent (and an error may quote)
    renders as \\ud800 instead of failing to encode as UTF-8 halfway through a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def sse(payload: dict | str) -> str:
    """One server-sent event (ASCII-escaped JSON, or a literal such as [DONE])."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=True)}\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # accepted; tmfast streams no obfuscation field


# Strict types: a JSON true is not the integer 1, "4" is not 4, "yes" is not true — what
# GenerationConfig would reject must not be coerced into something it accepts (an int stays
# acceptable where a number is: StrictFloat takes 2 as 2.0)
class CompletionRequest(BaseModel):
    """The body of POST /v1/completions."""
    model_config = ConfigDict(extra="forbid")

    # text, several texts, one token-id prompt, or several token-id prompts
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)  # None: GenerationConfig().max_new_tokens
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    # tmfast extras (None: GenerationConfig's default)
    tail: StrictInt | None = Field(None, ge=1)
    guidance: StrictFloat | None = None
    alpha_max: StrictFloat | None = None
    embryo_scale: StrictFloat | None = None
    history_noise: StrictFloat | None = None
    tail_noise: StrictFloat | None = None
    return_tail: StrictBool = False
    # OpenAI fields: Token Maturation decodes by nearest neighbour (no softmax, no sampling),
    # so sampling settings are accepted and ignored; the rest must keep their defaults
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    user: StrictStr | None = None
    n: StrictInt | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: StrictStr | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict[StrictStr, StrictFloat] | None = None


def check_supported(body: CompletionRequest) -> None:
    """400 for an OpenAI value that asks for something tmfast cannot do."""
    def no(param, why):
        raise ApiError(400, f"{param}: {why}", param, code="unsupported_value")
    if body.n not in (None, 1):
        no("n", "tmfast returns one completion per prompt; n must be 1 (send several prompts instead)")
    if body.best_of not in (None, 1):
        no("best_of", "decoding is deterministic argmax; best_of must be 1")
    if body.logprobs:
        no("logprobs", "tmfast commits by nearest neighbour and has no token log-probabilities")
    if body.echo:
        no("echo", "echoing the prompt is not supported")
    if body.suffix:
        no("suffix", "insertion (a suffix) is not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            no(name, "penalties are not supported (there are no logits to penalise)")
    if body.logit_bias:
        no("logit_bias", "there are no logits to bias")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """The stop strings as a tuple (GenerationConfig bounds their number and length)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for s in stops:
        if not is_unicode(s):
            raise ApiError(400, "stop: not valid Unicode (a lone surrogate escape such as \\ud800)", "stop")
    return stops


def generation_config(body: CompletionRequest, k_window: int) -> GenerationConfig:
    """The request's GenerationConfig; omitted fields take GenerationConfig's defaults (the one
    source of defaults, CLI and HTTP alike), except that the tail defaults to at most the
    engine's tail window."""
    default = GenerationConfig()
    tail = body.tail if body.tail is not None else min(default.tail, k_window)
    try:
        return default.overriding(
            max_new_tokens=body.max_tokens, tail=tail, guidance=body.guidance, seed=body.seed,
            stop=stop_strings(body.stop), alpha_max=body.alpha_max, embryo_scale=body.embryo_scale,
            history_noise=body.history_noise, tail_noise=body.tail_noise)
    except ConfigError as e:
        raise ApiError(400, api_message(str(e)), api_name(e.param), code="invalid_value") from None
    except (ValueError, TypeError, OverflowError) as e:  # a setting the config could not even compare
        raise ApiError(400, f"invalid generation settings: {e}", None, code="invalid_value") from None


def split_prompts(prompt) -> list[str | list[int]]:
    """One entry per engine request: a text, a list of texts, one id list, or several id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def is_unicode(text: str) -> bool:
    """False for a str holding lone surrogates (JSON's "\\ud800"): not text any tokenizer takes."""
    return unicode_error(text) is None


def openai_finish_reason(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's first complaint as a 400 naming the field (no echo of the value sent)."""
    if not errors:
        return ApiError(400, "invalid request body")
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    kind = err.get("type")
    if kind == "missing" and not loc:
        return ApiError(400, "the request body is empty: send a JSON object with a prompt", "prompt",
                        code="missing_body")
    if kind == "json_invalid":
        return ApiError(400, "request body is not valid JSON", code="invalid_json")
    if kind == "extra_forbidden":
        where = ".".join(loc)
        return ApiError(400, f"unknown field {where!r}", param, code="unknown_field")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return ApiError(400, "the request body must be a JSON object (content-type: application/json)",
                        code="invalid_json")
    if kind == "string_unicode":  # pydantic cannot even say where: a key, say
        return ApiError(400, f"{'.'.join(loc) or 'body'}: not valid Unicode (a lone surrogate escape such as "
                        "\\ud800)", param)
    if param == "prompt" and kind != "missing":
        return ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                        "token-id lists", "prompt", code="invalid_value")
    if param == "stop" and kind != "missing":
        return ApiError(400, "stop must be a string or a list of strings", "stop", code="invalid_value")
    if kind == "missing":
        return ApiError(400, f"{'.'.join(loc)}: field required", param, code="missing_field")
    return ApiError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg')}", param, code="invalid_value")
