"""The OpenAI request bodies the server accepts, as pydantic models.

Field names, defaults and ranges follow OpenAI's API (chat completions and the legacy
completions), plus the extensions that vLLM and llama.cpp's server also take: top_k, min_p,
repetition_penalty and ignore_eos. Unknown fields are ignored, as OpenAI's clients send some
that only matter elsewhere (user, metadata, ...). A value out of range is a 400 that names the
parameter (see `api_errors.bad_body_error`). Text fields are `Text`: a string that can be encoded
as UTF-8 (a lone UTF-16 surrogate, sent as a JSON escape or as CESU-8 bytes, is a 400, not a
failure deep in the tokenizer). Constraints the server enforces are declared here, so that
they are in the OpenAPI schema too: prompts are non-empty, token ids are strict non-negative
integers (`false` is not token 0), /tokenize takes exactly one of prompt or messages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
)

from minicpm.generation.sampling import SamplingParams

MAX_N = 16  # choices per request: each one takes a KV-cache slot
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
SEED_RANGE = (-(2**63), 2**64)  # what OpenAI takes: any signed or unsigned 64-bit value


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds a lone UTF-16 surrogate ({text[exc.start]!r} at character "
                         f"{exc.start}), which is not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Prompt = Annotated[Text, Field(min_length=1)]  # a prompt string: non-empty
TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = list[TokenId]
PromptIds = Annotated[TokenIds, Field(min_length=1)]  # a prompt as token ids: non-empty


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImageUrl(BaseModel):
    url: Annotated[str, Field(min_length=1)]  # a data:image/...;base64 URL, or http(s) if allowed
    detail: Literal["auto", "low", "high"] | None = None  # accepted; MiniCPM-V reads every image alike


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind)


# Chosen by "type", so a bad part gets only its own kind's complaints; the tags are the class
# names, which api_errors leaves out of the parameter path it reports.
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
    Discriminator(_part_kind, custom_error_type="invalid_content_part",
                  custom_error_message="a content part's type must be 'text' or 'image_url'")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        """The text parts, joined (image parts are `image_urls`)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both endpoints share: sampling, stopping, streaming, n."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: off (vLLM uses -1)
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    seed: Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1])] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Accepted by OpenAI and refused here with a 400: a silent ignore would be a wrong answer.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (non-negative integers), got {key!r}")
        return bias

    @field_validator("tools", "functions", "function_call")
    @classmethod
    def _no_tool_calls(cls, value: Any) -> Any:
        if value:
            raise ValueError("tool and function calling are not supported by this server")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        if value not in (None, "none"):
            raise ValueError("tool calling is not supported by this server (only 'none')")
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_16_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError("at most 16 stop sequences")
        return stop

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_new_tokens: int | None, choice: int, extra_stops: list[str] = ()) -> SamplingParams:
        """Settings for choice number `choice` (of n): each gets its own seed so that n seeded
        choices differ from one another but repeat across identical requests."""
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k, 0), min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else (self.seed + choice) % 2**64,  # the generator takes 64 bits
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            stop_token_ids=[] if self.ignore_eos else None, stop=self.stops() + list(extra_stops))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: what the context leaves
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """Alternatives per token the engine reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)] | PromptIds \
        | Annotated[list[PromptIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0: score the prompt only (with echo)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    suffix: None = None  # insertion is not supported: any value is a 400
    best_of: int | None = None  # only 1 (a silent ignore of more would be a wrong answer)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("only best_of 1 is supported; ask for n choices instead")
        return best_of

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class TokenizeRequest(BaseModel):
    """Exactly one of `prompt` (a string) or `messages` (rendered with the chat template)."""

    # the schema says "exactly one" too: one of the two is present and not null
    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    # validated after `messages` (and also when absent), so that the error names `prompt`
    prompt: Annotated[Text | None, Field(validate_default=True)] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompt_or_messages(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        if (prompt is None) == (info.data.get("messages") is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return prompt


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    tokens: TokenIds

