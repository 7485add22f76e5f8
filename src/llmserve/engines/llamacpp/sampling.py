"""Per-sequence llama.cpp sampler chains built from SamplingParams, and logprobs from logits.

llama.cpp lacks three samplers Kobold clients send: KoboldCpp's repetition penalty slope,
tail-free sampling and top-a. Each is a stage of the same C chain, a llama.cpp sampler whose
`apply` is a Python callback doing vectorised numpy over the candidate array in place
(`PythonStage`), so the chain's order and the grammar path stay as they are. What a stage
costs per token is in bench/README.md (`bench/sampler_cost.py`).
"""

from __future__ import annotations

import ctypes
import logging
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
KOBOLD_PREFILTER = 3000  # KoboldCpp cuts to its likeliest 3000 candidates before any sampler

log = logging.getLogger(__name__)


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
        self,
        handle: Any,
        history_samplers: list[Any],
        grammar: Any = None,
        n_vocab: int = 0,
        stages: Sequence[PythonStage] = (),
    ) -> None:
        self._handle = handle
        self._stages = list(stages)  # the C chain calls into these until it is freed
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

    def pick(self, logits: FloatRow) -> int:
        """The chain's pick from one logits row, grammar aside, not accepted (tests, benches)."""
        ids = np.arange(len(logits), dtype=np.int32)
        if len(self._candidates) < len(ids):
            self._candidates = np.empty(len(ids), dtype=TOKEN_DATA)
        token = self._pick(logits, ids, constrained=False)
        if token is None:
            raise InvalidRequestError("every token is impossible", param="logit_bias")
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
            self._stages = []
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


CandidateView = npt.NDArray[np.void]  # llama_token_data records, in place (TOKEN_DATA)


class PythonStage:
    """A llama.cpp sampler whose apply (and accept) are Python over the candidates, in place.

    The C side holds pointers into this object (the interface struct and the callbacks), so it
    must outlive the sampler: the SamplerChain that owns the sampler keeps it.
    """

    def __init__(self, name: str, stage: CandidateStage) -> None:
        self._stage = stage
        self._name = ctypes.create_string_buffer(name.encode())
        self._name_fn = _NAME_FN(lambda _smpl: ctypes.addressof(self._name))
        self._apply_fn = llama_cpp.llama_sampler_i_apply(self._apply)
        self._accept_fn = llama_cpp.llama_sampler_i_accept(self._accept)
        self._iface = llama_cpp.llama_sampler_i()  # zeroed: every other entry is NULL
        self._iface.name = ctypes.cast(self._name_fn, llama_cpp.llama_sampler_i_name)
        self._iface.apply = self._apply_fn
        if stage.wants_history:
            self._iface.accept = self._accept_fn
        self.handle = llama_cpp.llama_sampler_init(ctypes.byref(self._iface), None)

    def _apply(self, _smpl: Any, cur_p: Any) -> None:
        array = cur_p.contents
        if array.size == 0:
            return
        raw = (ctypes.c_byte * (array.size * TOKEN_DATA.itemsize)).from_address(
            ctypes.addressof(array.data.contents)
        )
        view = np.frombuffer(raw, dtype=TOKEN_DATA)
        try:
            kept, now_sorted = self._stage.apply(view, bool(array.sorted))
        except Exception:  # an exception cannot cross into C: leave the candidates as they are
            log.exception("sampler stage %s failed", self._name.value.decode())
            return
        array.size = kept
        array.sorted = now_sorted

    def _accept(self, _smpl: Any, token: int) -> None:
        self._stage.accept(int(token))


_NAME_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, llama_cpp.llama_sampler_p_ctypes)


class CandidateStage:
    """One numpy stage over a candidate array: returns (candidates kept, still sorted)."""

    wants_history = False

    def apply(self, view: CandidateView, is_sorted: bool) -> tuple[int, bool]:
        """Change `view` in place; keep its first N entries."""
        raise NotImplementedError

    def accept(self, token: int) -> None:
        """A token was added to the sequence (prompt or generated)."""


class TopA(CandidateStage):
    """KoboldCpp's top-a: drop tokens with p < a * p_max**2 (the likeliest always stays)."""

    def __init__(self, a: float) -> None:
        self.a = a

    def apply(self, view: CandidateView, is_sorted: bool) -> tuple[int, bool]:
        """Keep the candidates at or above the threshold, in their order."""
        logits = view["logit"]
        if len(view) <= 1 or not np.isfinite(logits.max()):
            return len(view), is_sorted  # nothing to cut, or every token banned
        # p_i = e_i / z, e_i = exp(l_i - l_max), p_max = 1 / z: p_i >= a / z**2 <=> e_i >= a / z.
        weights = np.exp(logits - logits.max())
        total = float(weights.sum(dtype=np.float64))
        keep = weights >= np.float32(self.a / total)
        keep[int(np.argmax(logits))] = True  # KoboldCpp's min_keep of 1, whatever rounding does
        return _compact(view, keep), is_sorted


class TailFree(CandidateStage):
    """KoboldCpp's tail-free sampling with z over the likeliest KOBOLD_PREFILTER candidates.

    Sorted by probability, the normalised |second differences| of the probabilities are summed
    from the top; the first position i >= 1 where the sum passes z is the first token cut.
    """

    def __init__(self, z: float) -> None:
        self.z = z

    def apply(self, view: CandidateView, is_sorted: bool) -> tuple[int, bool]:
        """Sort the head of the candidates and cut the tail."""
        if len(view) <= 2:
            return len(view), is_sorted
        order = _likeliest_first(view["logit"], is_sorted)
        logits = view["logit"][order].astype(np.float64)
        if not math.isfinite(logits[0]):
            return len(view), is_sorted  # every token banned: the pick reports it
        probs = np.exp(logits - logits[0])
        probs /= probs.sum()
        second = np.abs(np.diff(probs, n=2))
        total = second.sum()
        weights = second / total if total > 1e-6 else np.full(len(second), 1.0 / len(second))
        passed = np.flatnonzero(np.cumsum(weights) > self.z)
        passed = passed[passed >= MIN_KEEP]
        kept = int(passed[0]) if len(passed) else len(order)
        view[:kept] = view[order[:kept]]
        return kept, True


class SlopedRepetitionPenalty(CandidateStage):
    """KoboldCpp's repetition penalty with a slope over the last `window` tokens.

    Tokens in the newer half of the window get the full penalty; tokens only in the older half
    get 1 + (penalty - 1) * slope. A penalty divides positive logits and multiplies the others.
    """

    wants_history = True

    def __init__(self, penalty: float, slope: float, window: int) -> None:
        self.penalty = penalty
        self.reduced = 1.0 + (penalty - 1.0) * slope if penalty > 1.0 else penalty
        self.window = window
        # Twice the window, so the newest `window` tokens are always one slice, never copied.
        self._tokens = np.empty(2 * window, dtype=np.int32)
        self._count = 0

    def accept(self, token: int) -> None:
        """Remember the token in the window."""
        if self._count == len(self._tokens):
            self._tokens[: self.window] = self._tokens[self.window :]
            self._count = self.window
        self._tokens[self._count] = token
        self._count += 1

    def apply(self, view: CandidateView, is_sorted: bool) -> tuple[int, bool]:
        """Penalize every candidate the window holds."""
        recent = self._tokens[max(0, self._count - self.window) : self._count]
        if len(recent) == 0:
            return len(view), is_sorted
        # KoboldCpp: position i of n is "near" when 2 * i >= n.
        split = (len(recent) + 1) // 2
        near = np.unique(recent[split:])
        far = np.setdiff1d(recent[:split], near)
        ids = np.concatenate([near, far])
        factors = np.concatenate(
            [np.full(len(near), self.penalty), np.full(len(far), self.reduced)]
        ).astype(np.float32)
        rows, matched = _rows_of(view["id"], ids)
        logits = view["logit"][rows]
        scale = factors[matched]
        view["logit"][rows] = np.where(logits <= 0, logits * scale, logits / scale)
        return len(view), False


def _rows_of(candidate_ids: IdArray, ids: IdArray) -> tuple[IndexArray, IndexArray]:
    """Rows of `candidate_ids` holding one of `ids`, and which of `ids` each holds."""
    # Fast path: the full, unsorted array llama.cpp builds from the logits has row == id.
    inside = ids[ids < len(candidate_ids)]
    if len(inside) == len(ids) and np.array_equal(candidate_ids[inside], inside):
        return inside.astype(np.intp), np.arange(len(ids), dtype=np.intp)
    order = np.argsort(ids)
    sorted_ids = ids[order]
    spots = np.searchsorted(sorted_ids, candidate_ids)
    spots[spots == len(ids)] = 0
    rows = np.flatnonzero(sorted_ids[spots] == candidate_ids)
    return rows, order[spots[rows]]


def _likeliest_first(logits: FloatRow, is_sorted: bool) -> IndexArray:
    """Row indexes of the likeliest KOBOLD_PREFILTER candidates, most likely first."""
    head = min(len(logits), KOBOLD_PREFILTER)
    if is_sorted:
        return np.arange(head, dtype=np.intp)
    if head < len(logits):
        rows = np.argpartition(-logits, head - 1)[:head]
    else:
        rows = np.arange(head, dtype=np.intp)
    result: IndexArray = rows[np.argsort(-logits[rows], kind="stable")]
    return result


def _compact(view: CandidateView, keep: npt.NDArray[np.bool_]) -> int:
    """Move the kept candidates to the front, in order; their count."""
    kept = view[keep]
    view[: len(kept)] = kept
    return len(kept)


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
    stages: list[PythonStage] = []
    grammar = None if grammar_text is None else _grammar_sampler(vocab, grammar_text)
    try:
        bias = _logit_bias_sampler(params, n_vocab)
        if bias is not None:
            parts.append(bias)
        history.extend(_history_samplers(params, vocab, n_vocab, ctx_size, stages))
        parts.extend(history)
        parts.extend(_tail_samplers(params, n_vocab, seed, stages))
    except BaseException:
        for sampler in [*parts, *([grammar] if grammar is not None else [])]:
            llama_cpp.llama_sampler_free(sampler)
        raise
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in parts:
        llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain now owns it
    return SamplerChain(chain, history, grammar, n_vocab, stages)


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


def _history_samplers(
    params: SamplingParams, vocab: Any, n_vocab: int, ctx_size: int, stages: list[PythonStage]
) -> list[Any]:
    samplers: list[Any] = []
    last_n = _window(params.penalty_range, ctx_size)
    repetition = params.repetition_penalty
    if _sloped(params) and last_n > 0:
        sloped = SlopedRepetitionPenalty(repetition, params.repetition_penalty_slope, last_n)
        samplers.append(_stage("kobold-rep-pen-slope", sloped, stages))
        repetition = 1.0  # llama.cpp's penalties below add only frequency and presence
    penalties_active = (
        repetition != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )
    if penalties_active and last_n > 0:
        samplers.append(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                last_n,
                repetition,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.dry is not None and params.dry.multiplier > 0.0:
        samplers.append(_dry_sampler(params, vocab, ctx_size))
    return samplers


def _sloped(params: SamplingParams) -> bool:
    """Whether the slope changes anything: KoboldCpp slopes only penalties above 1."""
    return params.repetition_penalty > 1.0 and params.repetition_penalty_slope < 1.0


def _stage(name: str, stage: CandidateStage, stages: list[PythonStage]) -> Any:
    """The C sampler of a numpy stage, kept alive in `stages`."""
    wrapper = PythonStage(name, stage)
    stages.append(wrapper)
    return wrapper.handle


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


def _tail_samplers(
    params: SamplingParams, n_vocab: int, seed: int, stages: list[PythonStage]
) -> list[Any]:
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
        *_truncation_samplers(params, n_vocab, seed, stages),
        *temperature_samplers(params, n_vocab),
        llama_cpp.llama_sampler_init_dist(seed),
    ]


def temperature_samplers(params: SamplingParams, n_vocab: int) -> list[Any]:
    """Plain temperature, or llama.cpp's extended (entropy-scaled) one for `dynatemp_range`."""
    if params.dynatemp_range <= 0.0:
        return [llama_cpp.llama_sampler_init_temp(params.temperature)]
    # KoboldCpp's dynatemp is llama.cpp's extended temperature: the entropy, normalised by
    # log(candidates), picks a temperature in [max(0, t - range), t + range]. KoboldCpp has at
    # most its 3000 prefiltered candidates there; so does this chain, which also spares
    # temp_ext a sort of the whole vocabulary (~40 % of a step at 8 streams, bench/README.md).
    return [
        llama_cpp.llama_sampler_init_top_k(min(KOBOLD_PREFILTER, n_vocab)),
        llama_cpp.llama_sampler_init_temp_ext(
            params.temperature, params.dynatemp_range, params.dynatemp_exponent
        ),
    ]


def _truncation_samplers(
    params: SamplingParams, n_vocab: int, seed: int, stages: list[PythonStage]
) -> list[Any]:
    # KoboldCpp's default order (sampler_order 6,0,1,3,4,2,5): penalties, top-k, top-a, tail-free,
    # typical, top-p with min-p, then temperature.
    samplers: list[Any] = []
    if params.top_k is not None and params.top_k > 0:
        # Past the vocabulary top-k keeps everything; ctypes would wrap a huge k to <= 0.
        samplers.append(llama_cpp.llama_sampler_init_top_k(min(params.top_k, n_vocab)))
    if params.top_a > 0.0:
        samplers.append(_stage("kobold-top-a", TopA(params.top_a), stages))
    if params.tfs < 1.0:
        samplers.append(_stage("kobold-tail-free", TailFree(params.tfs), stages))
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
