"""Bodies of the HTTP requests, strict: unknown fields, wrong types and bad values are a 400
naming the field. Shapes follow the ecosystem: /generate and /update_weights_from_ipc as SGLang
sends them, /collective_rpc as vLLM's."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplingParams(_Strict):
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _greedy_only(self) -> SamplingParams:
        if self.temperature != 0.0:
            raise ValueError("only greedy decoding is served: temperature must be 0")
        return self


class GenerateRequest(_Strict):
    input_ids: list[int] | None = None
    text: str | None = None
    max_new_tokens: int | None = Field(default=None, ge=1)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    return_logits: bool = False
    rid: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("give exactly one of input_ids and text")
        if self.input_ids is not None and not self.input_ids:
            raise ValueError("input_ids is empty")
        both = self.max_new_tokens, self.sampling_params.max_new_tokens
        if None not in both and both[0] != both[1]:
            raise ValueError("max_new_tokens and sampling_params.max_new_tokens disagree")
        return self

    def new_tokens(self, default: int) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.sampling_params.max_new_tokens is not None:
            return self.sampling_params.max_new_tokens
        return default


class CollectiveRpcRequest(_Strict):
    method: str
    args: list = Field(default_factory=list)
    kwargs: dict = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)


class UpdateWeightsFromIpcRequest(_Strict):
    zmq_handles: dict[str, str] = Field(min_length=1)
    flush_cache: bool = True
    weight_version: str | None = None
    torch_empty_cache: bool = False
    rid: str | None = None
