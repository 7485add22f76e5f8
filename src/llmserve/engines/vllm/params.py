"""llmserve's SamplingParams and constraints as vLLM's, and which samplers vLLM has.

Samplers vLLM lacks (Kobold's tfs, top_a and rep_pen_slope, typical, top-n-sigma, DRY, XTC,
dynamic temperature, mirostat) are left out of SUPPORTED_SAMPLERS, so the capability check
refuses them with a 400 naming the field before any work. Settings that only tune one of
those (xtc_threshold, mirostat_tau, ...) change nothing while it is off, so they pass.
"""

from __future__ import annotations

from typing import Any

from llmserve.core.constraints import (
    Choice,
    Constraint,
    ConstraintKind,
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
    ToolCalls,
)
from llmserve.core.params import SamplingParams
from llmserve.engines.base import Capabilities

SUPPORTED_SAMPLERS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        # vLLM's penalties see the whole sequence: a window of N tokens is served as the
        # whole sequence, 0 turns the penalties off (README).
        "penalty_range",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "n",
        "logit_bias",
        "banned_token_ids",
        "logprobs",
        "prompt_logprobs",
        "xtc_threshold",
        "dynatemp_exponent",
        "mirostat_tau",
        "mirostat_eta",
    }
)
# Structured output goes through vLLM's structured-output backend (xgrammar, guidance, ...).
CAPABILITIES = Capabilities(
    constraints=frozenset(ConstraintKind),
    samplers=SUPPORTED_SAMPLERS,
    adapters=True,  # PEFT folders, when the engine was started with enable_lora
    embeddings=False,
)


def sampling_kwargs(params: SamplingParams, max_tokens: int, vocab_size: int) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for `params` (the output kind aside)."""
    kwargs: dict[str, Any] = {
        "n": params.n,
        "max_tokens": max_tokens,
        "temperature": max(params.temperature, 0.0),
        "top_p": params.top_p,
        "top_k": params.top_k or 0,  # vLLM: 0 is no cut
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "seed": params.seed,
        "stop": list(params.stop),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "min_tokens": params.min_tokens,
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
        "logit_bias": dict(params.logit_bias) or None,
    }
    if params.penalty_range == 0:  # an empty window: nothing is penalized
        kwargs |= {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if params.banned_token_ids:
        # vLLM clamps biases to ±100, which does not ban; an allow-list of the rest does.
        banned = set(params.banned_token_ids)
        kwargs["allowed_token_ids"] = [t for t in range(vocab_size) if t not in banned]
    return kwargs


# As the llama.cpp engine's grammars: integers of at most 16 digits. Unbounded, a small model
# at temperature 0 can write "1111..." until max_tokens runs out.
INTEGER_LIMIT = 10**16 - 1


def bounded_integers(schema: Any) -> Any:
    """`schema` with every integer lacking a bound given the 16-digit one."""
    if isinstance(schema, list):
        return [bounded_integers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_integers(value) for key, value in schema.items()}
    kind = schema.get("type")
    if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            bounded["maximum"] = INTEGER_LIMIT
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            bounded["minimum"] = -INTEGER_LIMIT
    return bounded


def structured_kwargs(constraint: Constraint) -> dict[str, Any]:
    """Keyword arguments of vLLM's StructuredOutputsParams for `constraint`."""
    if isinstance(constraint, JsonSchema):
        return {"json": bounded_integers(constraint.schema)}
    if isinstance(constraint, JsonObject):  # vLLM's json_object grammar ignores compact JSON
        return {"json": {"type": "object"}}
    if isinstance(constraint, Regex):
        return {"regex": constraint.pattern}
    if isinstance(constraint, Choice):
        return {"choice": list(constraint.choices)}
    if isinstance(constraint, Grammar):
        return {"grammar": constraint.text}
    if isinstance(constraint, ToolCalls):
        return {"json": bounded_integers(constraint.json_schema())}
    raise TypeError(f"no vLLM form for {type(constraint).__name__}")
