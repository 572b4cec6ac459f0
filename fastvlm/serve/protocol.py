"""The OpenAI chat-completions wire format: request models, error bodies and response builders.

Only what FastVLM can honour is accepted. Parameters that would change the answer in a
way the server cannot deliver (``n > 1``, tools, logprobs, penalties, JSON mode, logit
bias) are refused with a 400 naming the parameter, so a client never silently gets
something other than what it asked for. Unknown extra fields are ignored, as most
OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_UNION_LABEL = re.compile(r"^(str|int|float|bool|list\[.*|dict\[.*|tagged-union\[.*|function-.*|.*\[.*\])$")


def _loc(loc: tuple) -> str:
    """("messages", 0, "content", "list[...]", 1, "image_url") -> "messages[0].content[1].image_url".

    Pydantic puts the name of the union member it tried into the location; those are dropped.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_LABEL.match(str(part)) or part in ("TextPart", "ImagePart", "ImageURL"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error_to_api_error(e: ValidationError) -> APIError:
    """Pydantic's errors as one 400 whose message names the problems (the first one's field is `param`)."""
    errors = e.errors(include_url=False)
    seen: list[str] = []
    for err in errors:
        where = _loc(tuple(err.get("loc", ())))
        text = f"{where}: {err.get('msg', 'invalid value')}" if where else err.get("msg", "invalid value")
        if text not in seen:
            seen.append(text)
    more = f" (and {len(seen) - 4} more)" if len(seen) > 4 else ""
    first = _loc(tuple(errors[0].get("loc", ()))) if errors else ""
    return bad_request("invalid request: " + "; ".join(seen[:4]) + more, param=first or None)


# ---------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    # The OpenAI format is {"url": ...}; a bare string is accepted too.
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class RefusalPart(_Model):
    """An earlier assistant turn's refusal (OpenAI's assistant content part); rendered as its text."""

    type: Literal["refusal"]
    refusal: str

    @property
    def text(self) -> str:
        return self.refusal


ContentPart = Union[TextPart, ImagePart, RefusalPart]
_PART_MODELS = {"text": TextPart, "image_url": ImagePart, "refusal": RefusalPart}


def _parse_content(value: Any) -> Union[str, list[ContentPart]]:
    """A string, or a list of text / image_url parts; errors name the part and field at fault."""
    if isinstance(value, str):
        return value
    if value is None:
        raise PydanticCustomError("content_missing", "content is required (a string or a list of content parts)")
    if not isinstance(value, list):
        raise PydanticCustomError("content_type", "content must be a string or a list of content parts, got {t}",
                                  {"t": type(value).__name__})
    if not value:
        raise PydanticCustomError("content_empty", "content must not be an empty list")
    parts: list[ContentPart] = []
    for j, part in enumerate(value):
        if isinstance(part, (TextPart, ImagePart, RefusalPart)):
            parts.append(part)
            continue
        if not isinstance(part, dict):
            raise PydanticCustomError("part_type", "part {j} must be an object with a 'type', got {t}",
                                      {"j": j, "t": type(part).__name__})
        kind = part.get("type")
        model = _PART_MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise PydanticCustomError(
                "part_kind", "part {j} has unsupported type {kind} (supported: 'text', 'image_url', 'refusal')",
                {"j": j, "kind": repr(part.get("type"))})
        try:
            parts.append(model.model_validate(part))
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            field = _loc(tuple(err.get("loc", ())))
            raise PydanticCustomError("part_invalid", "part {j}{field}: {msg}",
                                      {"j": j, "field": f" field {field!r}" if field else "", "msg": err["msg"]}
                                      ) from None
    return parts


class Message(_Model):
    # "developer" is the newer OpenAI name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[Any, BeforeValidator(_parse_content)] = None
    name: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _require_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data:
            raise PydanticCustomError("content_missing", "content is required (a string or a list of content parts)")
        return data


class StreamOptions(_Model):
    include_usage: Optional[bool] = Field(None, strict=True)


class ChatCompletionRequest(_Model):
    model: Optional[str] = None
    messages: list[Message] = Field(min_length=1)
    # strict: a string or a boolean where a number belongs is refused, not converted ("8" -> 8, true -> 1)
    max_tokens: Optional[int] = Field(None, ge=1, strict=True)
    max_completion_tokens: Optional[int] = Field(None, ge=1, strict=True)
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, ge=0, le=1, strict=True, allow_inf_nan=False)
    # the range torch.Generator.manual_seed takes
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1, strict=True)
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = Field(None, strict=True)  # null means false, as in OpenAI's API
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(None, ge=1, strict=True)
    user: Optional[str] = None
    # Parameters accepted only at their neutral value (anything else is refused below).
    presence_penalty: Optional[float] = Field(None, strict=True, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(None, strict=True, allow_inf_nan=False)
    logprobs: Optional[bool] = Field(None, strict=True)
    top_logprobs: Optional[int] = Field(None, strict=True)
    logit_bias: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    # Extensions (as in vLLM): not part of the OpenAI API.
    top_k: Optional[int] = Field(None, ge=0, strict=True)
    repetition_penalty: Optional[float] = Field(None, ge=1e-4, le=1e4, strict=True, allow_inf_nan=False)
    ignore_eos: bool = Field(False, strict=True)

    def check_supported(self) -> None:
        """Refuse what the server cannot honour, naming the parameter."""
        if self.n is not None and self.n != 1:
            raise bad_request("n > 1 is not supported: ask for one choice per request", param="n",
                              code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported (use repetition_penalty, a server extension)",
                                  param=name, code="unsupported_parameter")
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", param="logprobs", code="unsupported_parameter")
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            raise bad_request(f"only text output is supported, got modalities {self.modalities}", param="modalities",
                              code="unsupported_parameter")
        if self.audio is not None:
            raise bad_request("audio output is not supported", param="audio", code="unsupported_parameter")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_parameter")
        if (self.tools or self.functions or self.tool_choice not in (None, "none")
                or self.function_call not in (None, "none")):
            raise bad_request("tool and function calling are not supported", param="tools",
                              code="unsupported_parameter")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                              code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")

    def stop_list(self, max_stop: int) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > max_stop:
            raise bad_request(f"at most {max_stop} stop sequences are supported, got {len(stop)}", param="stop")
        if any(s == "" for s in stop):
            raise bad_request("stop sequences must not be empty", param="stop")
        return stop


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_response(*, id: str, model: str, created: int, text: str, finish_reason: str,
                        usage: dict, timings: dict) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage,
        "timings": timings,
    }


def chunk(*, id: str, model: str, created: int, delta: Optional[dict] = None,
          finish_reason: Optional[str] = None, usage: Optional[dict] = None,
          timings: Optional[dict] = None, include_usage: bool = False, no_choices: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [] if no_choices else [{
            "index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason,
        }],
    }
    if include_usage:
        out["usage"] = usage  # null on every chunk but the last, as OpenAI does
    if timings is not None:
        out["timings"] = timings
    return out


def model_card(name: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fastvlm", **extra}


def now() -> int:
    return int(time.time())
