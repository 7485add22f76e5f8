"""Per-sequence llama.cpp sampler chains built from SamplingParams, and logprobs from logits."""

from __future__ import annotations

import ctypes
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from llmserve.core.errors import InvalidRequestError
from llmserve.core.limits import GRAMMAR_ERROR_CODE
from llmserve.core.params import MirostatMode, SamplingParams
from llmserve.core.request import TokenLogprob, TopLogprob

SEED_MODULUS = 2**32  # llama.cpp seeds are uint32
MIROSTAT_V1_M = 100  # candidates mirostat v1 estimates s_hat from (the paper's m)
MIN_KEEP = 1  # truncation samplers always leave at least one candidate

FloatRow = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int32]
# llama_token_data as numpy sees it, for candidate arrays filled without Python loops.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
GRAMMAR_SHORTLIST = 128  # candidates a rejected pick is first re-drawn from (see SamplerChain)
PieceLookup = Callable[[int], bytes]


def choice_seed(seed: int | None, index: int) -> int:
    """The dist/XTC/mirostat seed for choice `index`: seed + index, or random without a seed."""
    if seed is None:
        return secrets.randbits(32)
    return (seed + index) % SEED_MODULUS


class SamplerChain:
    """One sequence's llama.cpp sampler chain; owns the C objects until `free()`.

    A grammar is kept out of the chain: applying it to all ~50k candidates costs several
    milliseconds, in the step every sequence shares. As llama.cpp's own common sampler does,
    the chain picks first and the grammar checks only that token. When it rejects it (about a
    third of the steps in JSON), the grammar and the chain run again over the GRAMMAR_SHORTLIST
    likeliest tokens, and over all of them only when none of those is allowed.
    """

    def __init__(
        self, handle: Any, history_samplers: list[Any], grammar: Any = None, n_vocab: int = 0
    ) -> None:
        self._handle = handle
        # Penalties and DRY look back over earlier tokens; they are fed the prompt too,
        # without the grammar (which must only see generated text).
        self._history_samplers = history_samplers
        self._grammar = grammar
        self._all_ids = np.arange(n_vocab if grammar else 0, dtype=np.int32)
        self._candidates = np.empty(len(self._all_ids), dtype=TOKEN_DATA)
        self.grammar_resamples = 0  # picks the grammar rejected (for tests and measurements)

    def accept_history(self, tokens: Sequence[int]) -> None:
        """Feed earlier tokens (the prompt) to the samplers that penalize repetition."""
        for sampler in self._history_samplers:
            for token in tokens:
                llama_cpp.llama_sampler_accept(sampler, token)

    def sample(self, ctx: Any, batch_index: int) -> int:
        """Pick (and accept) the next token from the logits row of batch entry `batch_index`."""
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._handle, ctx, batch_index))
        pointer = llama_cpp.llama_get_logits_ith(ctx, batch_index)
        return self.sample_constrained(np.ctypeslib.as_array(pointer, shape=(len(self._all_ids),)))

    def sample_constrained(self, logits: FloatRow) -> int:
        """Pick (and accept) a token the grammar allows from one logits row."""
        token = self._pick(logits, self._all_ids, constrained=False)
        if token is None or not self._grammar_allows(token):
            self.grammar_resamples += 1
            token = self._resample(logits)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._handle, token)
        return token

    def _resample(self, logits: FloatRow) -> int:
        """A pick the grammar allows: from the likeliest tokens if it can, else from all."""
        # The tokens a grammar wants where it rejects the model's pick (a quote, a comma, a
        # key) are nearly always among the likeliest. For greedy decoding this is exact.
        shortlist = np.argpartition(logits, -GRAMMAR_SHORTLIST)[-GRAMMAR_SHORTLIST:]
        token = self._pick(logits, shortlist.astype(np.int32), constrained=True)
        if token is None:
            token = self._pick(logits, self._all_ids, constrained=True)
        if token is None:
            # Accepting a token the grammar forbids aborts llama.cpp: fail the request instead.
            raise InvalidRequestError(
                "no token allowed by the grammar is left after logit_bias and banned tokens",
                param="grammar",
            )
        return token

    def _pick(self, logits: FloatRow, ids: IdArray, constrained: bool) -> int | None:
        """Run the chain (after the grammar, if `constrained`) over the candidates `ids`.

        None when every candidate is impossible (-inf), so nothing can be picked.
        """
        candidates = self._candidates[: len(ids)]
        candidates["id"] = ids
        candidates["logit"] = logits if ids is self._all_ids else logits[ids]
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            candidates.ctypes.data_as(llama_cpp.llama_token_data_p), len(ids), -1, False
        )
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._handle, ctypes.byref(array))
        chosen = array.data[array.selected]  # samplers may have moved `data`
        return None if chosen.logit == -math.inf else int(chosen.id)

    def _grammar_allows(self, token: int) -> bool:
        single = llama_cpp.llama_token_data(token, 1.0, 0.0)
        array = llama_cpp.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(single.logit != -math.inf)

    def free(self) -> None:
        """Free the chain and every sampler in it; safe to call twice."""
        if self._handle is not None:
            llama_cpp.llama_sampler_free(self._handle)
            self._handle = None
            self._history_samplers = []
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def check_grammar(vocab: Any, grammar: str, param: str = "grammar") -> None:
    """Raise InvalidRequestError (naming `param`) when llama.cpp cannot parse `grammar`."""
    sampler = _grammar_sampler(vocab, grammar, param)
    llama_cpp.llama_sampler_free(sampler)


def build_sampler_chain(
    params: SamplingParams,
    grammar_text: str | None,
    vocab: Any,
    n_vocab: int,
    ctx_size: int,
    seed: int,
) -> SamplerChain:
    """Build the chain for one sequence: bias, penalties, truncation, the pick; grammar aside."""
    parts: list[Any] = []
    history: list[Any] = []
    grammar = None if grammar_text is None else _grammar_sampler(vocab, grammar_text)
    try:
        bias = _logit_bias_sampler(params, n_vocab)
        if bias is not None:
            parts.append(bias)
        history.extend(_history_samplers(params, vocab, n_vocab, ctx_size))
        parts.extend(history)
        parts.extend(_tail_samplers(params, n_vocab, seed))
    except BaseException:
        for sampler in [*parts, *([grammar] if grammar is not None else [])]:
            llama_cpp.llama_sampler_free(sampler)
        raise
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in parts:
        llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain now owns it
    return SamplerChain(chain, history, grammar, n_vocab)


def _grammar_sampler(vocab: Any, grammar: str, param: str = "grammar") -> Any:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise InvalidRequestError(
            f"{param}: the grammar is not valid GBNF", param=param, code=GRAMMAR_ERROR_CODE
        )
    return sampler


def _logit_bias_sampler(params: SamplingParams, n_vocab: int) -> Any | None:
    biases = {int(token): float(bias) for token, bias in params.logit_bias.items()}
    for token in params.banned_token_ids:
        biases[token] = float("-inf")
    if not biases:
        return None
    array = (llama_cpp.llama_logit_bias * len(biases))()
    for slot, (token, bias) in enumerate(biases.items()):
        array[slot].token = token
        array[slot].bias = bias
    return llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), array)


def _history_samplers(params: SamplingParams, vocab: Any, n_vocab: int, ctx_size: int) -> list[Any]:
    samplers: list[Any] = []
    penalties_active = (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )
    last_n = _window(params.penalty_range, ctx_size)
    if penalties_active and last_n > 0:
        samplers.append(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                last_n,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.dry is not None and params.dry.multiplier > 0.0:
        samplers.append(_dry_sampler(params, vocab, ctx_size))
    return samplers


def _dry_sampler(params: SamplingParams, vocab: Any, ctx_size: int) -> Any:
    dry = params.dry
    assert dry is not None
    breakers = [text.encode() for text in dry.sequence_breakers if text]
    array = (ctypes.c_char_p * max(1, len(breakers)))(*breakers)
    # llama.cpp reads a negative look-back as "disabled", so "whole context" is explicit.
    last_n = _window(dry.penalty_last_n, ctx_size)
    return llama_cpp.llama_sampler_init_dry(
        vocab,
        dry.multiplier,
        dry.base,
        min(dry.allowed_length, ctx_size),  # no repeat is longer than the context
        last_n,
        array,
        len(breakers),
    )


def _window(requested: int | None, ctx_size: int) -> int:
    """A look-back window in tokens: None is the whole context, and no window exceeds it.

    llama.cpp allocates penalty and DRY buffers of the window's size up front (a request for
    2**30 tokens took 4 GB, DRY 8 GB); a sequence never holds more than `ctx_size` tokens.
    """
    return ctx_size if requested is None else min(requested, ctx_size)


def _tail_samplers(params: SamplingParams, n_vocab: int, seed: int) -> list[Any]:
    if params.greedy:
        # Truncation never changes the argmax (XTC would, but it is random by design).
        return [llama_cpp.llama_sampler_init_greedy()]
    if params.mirostat is MirostatMode.V1:
        return [
            llama_cpp.llama_sampler_init_temp(params.temperature),
            llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, params.mirostat_tau, params.mirostat_eta, MIROSTAT_V1_M
            ),
        ]
    if params.mirostat is MirostatMode.V2:
        return [
            llama_cpp.llama_sampler_init_temp(params.temperature),
            llama_cpp.llama_sampler_init_mirostat_v2(
                seed, params.mirostat_tau, params.mirostat_eta
            ),
        ]
    return [
        *_truncation_samplers(params, n_vocab, seed),
        llama_cpp.llama_sampler_init_temp(params.temperature),
        llama_cpp.llama_sampler_init_dist(seed),
    ]


def _truncation_samplers(params: SamplingParams, n_vocab: int, seed: int) -> list[Any]:
    samplers: list[Any] = []
    if params.top_k is not None and params.top_k > 0:
        # Past the vocabulary top-k keeps everything; ctypes would wrap a huge k to <= 0.
        samplers.append(llama_cpp.llama_sampler_init_top_k(min(params.top_k, n_vocab)))
    if params.typical_p < 1.0:
        samplers.append(llama_cpp.llama_sampler_init_typical(params.typical_p, MIN_KEEP))
    if params.top_p < 1.0:
        samplers.append(llama_cpp.llama_sampler_init_top_p(params.top_p, MIN_KEEP))
    if params.min_p > 0.0:
        samplers.append(llama_cpp.llama_sampler_init_min_p(params.min_p, MIN_KEEP))
    if params.xtc_probability > 0.0:
        samplers.append(
            llama_cpp.llama_sampler_init_xtc(
                params.xtc_probability, params.xtc_threshold, MIN_KEEP, seed
            )
        )
    if params.top_n_sigma is not None and params.top_n_sigma > 0.0:
        samplers.append(llama_cpp.llama_sampler_init_top_n_sigma(params.top_n_sigma))
    return samplers


FloatRows = npt.NDArray[np.float32]  # 2-D: one logits row per position
WideArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]


@dataclass(frozen=True)
class ScoredRows:
    """Logits rows scored in one vectorized pass: log-normalizers and likeliest tokens.

    Nothing here is vocabulary-sized per token in Python or float64: logprobs are
    `logit - log_norm`, a scalar subtraction, so the rows stay float32 (and, for prompt rows,
    stay llama.cpp's own memory, uncopied).
    """

    rows: FloatRows
    log_norm: WideArray  # per row: log(sum(exp(row)))
    top_ids: IndexArray  # per row: the likeliest tokens, most likely first, ties by id

    def token_entry(self, row: int, token_id: int, top_n: int, piece: PieceLookup) -> TokenLogprob:
        """Token `token_id`'s logprob at `row`, with the row's `top_n` likeliest tokens."""
        raw = piece(token_id)
        return TokenLogprob(
            token_id=token_id,
            token=raw.decode("utf-8", errors="replace"),
            logprob=self._logprob(row, token_id),
            top=self.top_entries(row, top_n, piece),
            bytes=tuple(raw),
        )

    def top_entries(self, row: int, top_n: int, piece: PieceLookup) -> tuple[TopLogprob, ...]:
        """The `top_n` likeliest tokens at `row`, most likely first."""
        if top_n <= 0:
            return ()
        ids = self.top_ids[row, :top_n].tolist()
        return tuple(_top_entry(token, self._logprob(row, token), piece) for token in ids)

    def _logprob(self, row: int, token_id: int) -> float:
        return float(self.rows[row, token_id]) - float(self.log_norm[row])


def score_rows(rows: FloatRows, top_n: int) -> ScoredRows:
    """Score a 2-D block of logits rows at once (at most `top_n` candidates kept per row)."""
    return ScoredRows(rows=rows, log_norm=log_normalizers(rows), top_ids=top_token_ids(rows, top_n))


def log_normalizers(rows: FloatRows) -> WideArray:
    """log(sum(exp(row))) per row, stably: max + log(sum(exp(row - max)))."""
    peak = rows.max(axis=1)
    shifted = rows - peak[:, np.newaxis]  # float32: the one vocabulary-sized temporary
    np.exp(shifted, out=shifted)
    # Only the per-row sums are widened: the float32 exps are good to ~1e-7 each, and
    # float64 accumulation adds nothing to that over the whole vocabulary.
    total = shifted.sum(axis=1, dtype=np.float64)
    result: WideArray = peak.astype(np.float64) + np.log(total)
    return result


def top_token_ids(rows: FloatRows, top_n: int) -> IndexArray:
    """Per row the `top_n` highest logits' token ids, most likely first, ties by token id."""
    count = min(max(top_n, 0), rows.shape[1])
    if count == 0:
        return np.empty((rows.shape[0], 0), dtype=np.intp)
    # A partial sort (linear in the vocabulary), then a sort of only `count` candidates.
    candidates = np.argpartition(rows, -count, axis=1)[:, -count:]
    values = np.take_along_axis(rows, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=-1)
    result: IndexArray = np.take_along_axis(candidates, order, axis=1)
    return result


def token_logprobs(
    rows: FloatRows, token_ids: Sequence[int], top_n: int, piece: PieceLookup
) -> list[TokenLogprob]:
    """Token `token_ids[i]`'s logprob under `rows[i]`, each with its row's `top_n` likeliest."""
    scored = score_rows(rows, top_n)
    return [scored.token_entry(i, token, top_n, piece) for i, token in enumerate(token_ids)]


def _top_entry(token_id: int, logprob: float, piece: PieceLookup) -> TopLogprob:
    raw = piece(token_id)
    return TopLogprob(
        token_id=token_id,
        token=raw.decode("utf-8", errors="replace"),
        logprob=logprob,
        bytes=tuple(raw),
    )


def mask_tokens(row: FloatRow, token_ids: Sequence[int]) -> None:
    """Make `token_ids` impossible by writing -inf into the (llama.cpp-owned) logits row."""
    if token_ids:
        row[np.asarray(token_ids, dtype=np.intp)] = -np.inf
