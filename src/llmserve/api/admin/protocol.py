"""Pydantic models of the management API (TabbyAPI's shapes) and the vLLM token routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmserve.api.common import ChatMessage, continues_final_message
from llmserve.api.overrides import OverrideValue
from llmserve.models.catalog import Duration


class ModelLoadRequest(BaseModel):
    """POST /v1/model/load: a model of the models folder, and engine settings for this load.

    Any engine setting (`engine`, `ctx_size`, `parallel`, `n_gpu_layers`, ... as in config.yml)
    may be given; the chosen engine validates them. Fields no engine has are ignored (the
    manager logs them), as TabbyAPI clients send settings of its own backends.
    """

    model_config = ConfigDict(extra="allow")

    model_name: str = Field(min_length=1)
    max_seq_len: int | None = Field(None, description="TabbyAPI's name for ctx_size.")
    keep_alive: Duration = Field(
        default=None, description="Unload it when idle this long (see config's keep_alive)."
    )
    stream: bool = False

    def engine_overrides(self) -> dict[str, Any]:
        """The engine settings this load asks for, by their config names."""
        overrides = dict(self.model_extra or {})
        if self.max_seq_len is not None:
            overrides.setdefault("ctx_size", self.max_seq_len)
        return overrides


class ModelUnloadRequest(BaseModel):
    """POST /v1/model/unload: one model by name, or (no body) every loaded model."""

    model_name: str | None = Field(default=None, min_length=1)


class ModelLoadProgress(BaseModel):
    """One progress event of a streamed model load."""

    model_type: Literal["model"] = "model"
    module: int
    modules: int
    stage: str
    progress: float
    status: Literal["processing", "finished"]


class ModelCardDetails(BaseModel):
    """GET /v1/model: the loaded model in detail."""

    id: str
    object: Literal["model"] = "model"
    aliases: list[str]
    path: str
    context_length: int
    train_context_length: int
    parameters: int
    size_bytes: int
    quantization: str
    description: str
    chat_template_source: str
    loaded: bool = True


class StatusResponse(BaseModel):
    """A management action's outcome."""

    status: str
    detail: str | None = None


class LoraSpec(BaseModel):
    """One adapter to apply and its strength."""

    name: str = Field(min_length=1)
    scaling: float = 1.0


MODEL_FIELD = "The loaded model it acts on (id or alias); empty: the default model."


class ModelTarget(BaseModel):
    """The body of an unload route: which loaded model (none: the default)."""

    model: str | None = Field(default=None, min_length=1, description=MODEL_FIELD)


class LoraLoadRequest(BaseModel):
    """POST /v1/lora/load."""

    loras: list[LoraSpec] = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1, description=MODEL_FIELD)


class LoraCard(BaseModel):
    """An entry of GET /v1/loras."""

    id: str
    object: Literal["lora"] = "lora"
    scaling: float | None = None
    active: bool


class LoraList(BaseModel):
    """GET /v1/loras: the adapters of one model."""

    object: Literal["list"] = "list"
    model: str = Field(description="The model whose adapters these are.")
    data: list[LoraCard]


class OverrideSwitchRequest(BaseModel):
    """POST /v1/sampling/override/switch: a preset by name, or inline overrides."""

    preset: str | None = None
    overrides: dict[str, OverrideValue] | None = None


class OverrideList(BaseModel):
    """GET /v1/sampling/overrides."""

    selected_preset: str | None
    presets: list[str]
    overrides: dict[str, OverrideValue]


class TemplateSwitchRequest(BaseModel):
    """POST /v1/template/switch."""

    name: str = Field(min_length=1)
    model: str | None = Field(default=None, min_length=1, description=MODEL_FIELD)


class TemplateList(BaseModel):
    """GET /v1/templates: the templates of the folder and the one a model renders with."""

    object: Literal["list"] = "list"
    model: str = Field(description="The model whose active template `active` is.")
    data: list[str]
    active: str


class TokenEncodeRequest(BaseModel):
    """POST /v1/token/encode (TabbyAPI): text or chat messages."""

    text: str | list[ChatMessage]
    add_bos_token: bool = True
    encode_special_tokens: bool = True


class TokenEncodeResponse(BaseModel):
    """Token ids and their count."""

    tokens: list[int]
    length: int


class TokenDecodeRequest(BaseModel):
    """POST /v1/token/decode (TabbyAPI)."""

    tokens: list[int]


class TokenDecodeResponse(BaseModel):
    """The decoded text."""

    text: str


class TokenizeRequest(BaseModel):
    """POST /tokenize in vLLM's shape (`prompt` or `messages`) or llama.cpp's (`content`)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    content: str | list[str | Annotated[int, Field(ge=0)]] | None = Field(
        None, description="llama.cpp's field: text, token ids, or a mix of both."
    )
    add_special_tokens: bool | None = Field(None, description="vLLM's name; default true.")
    add_special: bool | None = Field(None, description="llama.cpp's name; default false.")
    parse_special: bool = Field(True, description="Special-token text is always parsed.")
    with_pieces: bool = False
    add_generation_prompt: bool = True
    # As on chat: None continues a trailing assistant message unless add_generation_prompt is sent.
    continue_final_message: bool | None = None

    def adds_special(self) -> bool:
        """Whether BOS &c. are added: either flag when sent, else each API's own default."""
        for flag in (self.add_special, self.add_special_tokens):
            if flag is not None:
                return flag
        return self.content is None  # vLLM adds them by default, llama.cpp does not

    def continues_final_message(self) -> bool:
        """Whether the rendered chat ends inside its final assistant message, as chat would."""
        return continues_final_message(
            self.messages or [],
            self.continue_final_message,
            self.add_generation_prompt,
            explicit_prompt="add_generation_prompt" in self.model_fields_set,
        )


class TokenPiece(BaseModel):
    """A token with its text (llama.cpp's `with_pieces`)."""

    id: int
    piece: str


class TokenizeResponse(BaseModel):
    """Both APIs' tokenize answer: `tokens` (objects only with `with_pieces`), `count`, ..."""

    tokens: list[int] | list[TokenPiece]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's and llama.cpp's: both send `tokens`)."""

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    """Both APIs' detokenize answer: vLLM reads `prompt`, llama.cpp `content`."""

    prompt: str
    content: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: what lm-eval's remote tokenizer reads."""

    tokenizer_class: str = "llama.cpp"
    model: str
    bos_token: str
    eos_token: str
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str
    model_max_length: int
    vocab_size: int
    extra: dict[str, Any] = {}
