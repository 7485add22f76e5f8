"""KoboldCpp's samplers (rep_pen_slope, tail-free, top-a) and dynatemp on hand-made logits.

Each stage runs through llama.cpp's own sampler interface (`llama_sampler_apply`, `accept`,
chains), and its result is compared with KoboldCpp's formulas, written out here loop by loop
as KoboldCpp states them, and with a few cases worked by hand.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np
import pytest

from llmserve.core.errors import InvalidRequestError
from llmserve.core.params import SamplingParams
from llmserve.engines.llamacpp.sampling import (
    KOBOLD_PREFILTER,
    TOKEN_DATA,
    CandidateStage,
    PythonStage,
    SamplerChain,
    SlopedRepetitionPenalty,
    TailFree,
    TopA,
    build_sampler_chain,
    temperature_samplers,
)

Candidates = list[tuple[int, float]]  # (token id, logit) in array order


@pytest.fixture
def handles() -> Iterator[list[Any]]:
    """C samplers made here (stages keep their Python side alive), freed after the test."""
    made: list[Any] = []
    yield made
    for item in made:
        if isinstance(item, SamplerChain):
            item.free()
        else:
            llama_cpp.llama_sampler_free(item.handle if isinstance(item, PythonStage) else item)


def stage(handles: list[Any], numpy_stage: CandidateStage) -> PythonStage:
    wrapper = PythonStage("test", numpy_stage)
    handles.append(wrapper)
    return wrapper


def apply(handle: Any, ids: Sequence[int], logits: Sequence[float]) -> tuple[Candidates, bool]:
    """Run one llama.cpp sampler over the candidates; what is left, and the sorted flag."""
    data = np.empty(len(ids), dtype=TOKEN_DATA)
    data["id"] = ids
    data["logit"] = logits
    data["p"] = 0.0
    array = llama_cpp.llama_token_data_array(
        data.ctypes.data_as(llama_cpp.llama_token_data_p), len(ids), -1, False
    )
    llama_cpp.llama_sampler_apply(handle, ctypes.byref(array))
    left = [(int(d["id"]), float(d["logit"])) for d in data[: array.size]]
    return left, bool(array.sorted)


def log_probs(probs: Sequence[float]) -> list[float]:
    return [math.log(p) for p in probs]


# ---- KoboldCpp's formulas, as its C++ states them (reference implementations) ----


def softmax_sorted(cands: Candidates) -> list[tuple[int, float, float]]:
    """(id, logit, p), likeliest first."""
    ordered = sorted(cands, key=lambda c: -c[1])
    top = ordered[0][1]
    weights = [math.exp(logit - top) for _, logit in ordered]
    total = sum(weights)
    return [(tid, logit, w / total) for (tid, logit), w in zip(ordered, weights, strict=True)]


def kobold_top_a(cands: Candidates, a: float) -> set[int]:
    rows = softmax_sorted(cands)
    threshold = a * rows[0][2] * rows[0][2]
    keep = len(rows)
    for i, (_, _, p) in enumerate(rows):
        if p < threshold and i >= 1:
            keep = i
            break
    return {tid for tid, _, _ in rows[:keep]}


def kobold_tail_free(cands: Candidates, z: float) -> list[int]:
    rows = softmax_sorted(cands)
    p = [r[2] for r in rows]
    first = [p[i] - p[i + 1] for i in range(len(p) - 1)]
    second = [abs(first[i] - first[i + 1]) for i in range(len(first) - 1)]
    total = sum(second)
    second = [v / total for v in second] if total > 1e-6 else [1 / len(second)] * len(second)
    cum, keep = 0.0, len(rows)
    for i, value in enumerate(second):
        cum += value
        if cum > z and i >= 1:
            keep = i
            break
    return [tid for tid, _, _ in rows[:keep]]


def kobold_rep_pen(
    cands: Candidates, history: list[int], window: int, penalty: float, slope: float
) -> dict[int, float]:
    last = history[-window:]
    near = {t for i, t in enumerate(last) if i * 2 >= len(last)}
    far = {t for i, t in enumerate(last) if i * 2 < len(last)}
    reduced = 1 + (penalty - 1) * slope if penalty > 1 else penalty
    out: dict[int, float] = {}
    for tid, logit in cands:
        if tid in near or tid in far:
            factor = penalty if tid in near else reduced
            logit = logit * factor if logit <= 0 else logit / factor
        out[tid] = logit
    return out


# ---- top-a ----


@pytest.mark.parametrize(("a", "survivors"), [(1.0, {0, 1}), (0.5, {0, 1, 2}), (0.3, {0, 1, 2})])
def test_top_a_by_hand(handles: list[Any], a: float, survivors: set[int]) -> None:
    # p_max = 0.5: the threshold is a / 4 (0.25, 0.125, 0.075).
    probs = [0.5, 0.3, 0.15, 0.05]
    left, _ = apply(stage(handles, TopA(a)).handle, [0, 1, 2, 3], log_probs(probs))
    assert {tid for tid, _ in left} == survivors
    # Logits are untouched: top-a only cuts.
    assert all(logit == pytest.approx(math.log(probs[tid]), abs=1e-6) for tid, logit in left)


def test_top_a_matches_kobold_on_random_logits(handles: list[Any]) -> None:
    rng = np.random.default_rng(3)
    for a in (0.05, 0.2, 0.7):
        ids = rng.permutation(200).tolist()
        logits = (rng.normal(size=200) * 3).astype(np.float32).tolist()
        left, is_sorted = apply(stage(handles, TopA(a)).handle, ids, logits)
        expected = kobold_top_a(list(zip(ids, logits, strict=True)), a)
        assert {tid for tid, _ in left} == expected
        assert 1 <= len(expected) < 200
        # Order is kept: the survivors appear in their input order, still unsorted.
        assert [tid for tid, _ in left] == [t for t in ids if t in expected]
        assert not is_sorted


# ---- tail-free ----


@pytest.mark.parametrize(("z", "survivors"), [(0.4, [0]), (0.6, [0, 1]), (0.99, [0, 1])])
def test_tail_free_by_hand(handles: list[Any], z: float, survivors: list[int]) -> None:
    # p = .35 .3 .2 .1 .05: first differences .05 .1 .1 .05, |second| .05 0 .05, normalised
    # .5 0 .5, running sum .5 .5 1: past z at position 1 (z < .5) or 2; position 0 never cuts.
    probs = [0.35, 0.3, 0.2, 0.1, 0.05]
    ids = [3, 0, 4, 1, 2]  # shuffled input
    logits = [math.log(probs[t]) for t in ids]
    left, is_sorted = apply(stage(handles, TailFree(z)).handle, ids, logits)
    assert [tid for tid, _ in left] == survivors  # likeliest first
    assert is_sorted


def test_tail_free_matches_kobold_on_random_logits(handles: list[Any]) -> None:
    rng = np.random.default_rng(5)
    for z in (0.3, 0.8, 0.95):
        ids = rng.permutation(300).tolist()
        logits = (rng.normal(size=300) * 2).astype(np.float32).tolist()
        left, _ = apply(stage(handles, TailFree(z)).handle, ids, logits)
        expected = kobold_tail_free(list(zip(ids, logits, strict=True)), z)
        assert [tid for tid, _ in left] == expected
        assert 1 <= len(expected) < 300


def test_tail_free_looks_at_the_likeliest_prefilter_as_kobold(handles: list[Any]) -> None:
    # KoboldCpp cuts to its likeliest 3000 candidates before any sampler: so does the stage.
    rng = np.random.default_rng(8)
    n = KOBOLD_PREFILTER + 2000
    ids = rng.permutation(n).tolist()
    logits = (rng.normal(size=n) * 2).astype(np.float32).tolist()
    left, _ = apply(stage(handles, TailFree(0.97)).handle, ids, logits)
    head = sorted(zip(ids, logits, strict=True), key=lambda c: -c[1])[:KOBOLD_PREFILTER]
    assert [tid for tid, _ in left] == kobold_tail_free(head, 0.97)


# ---- repetition penalty with slope ----


def sloped(handles: list[Any], history: list[int], window: int, slope: float) -> PythonStage:
    wrapper = stage(handles, SlopedRepetitionPenalty(1.5, slope, window))
    for token in history:
        llama_cpp.llama_sampler_accept(wrapper.handle, token)
    return wrapper


def test_rep_pen_slope_by_hand(handles: list[Any]) -> None:
    # Window 4 over 9 5 6 7 8: 5 6 are the older half (penalty 1 + 0.5 * 0.5 = 1.25),
    # 7 8 the newer (1.5); 9 left the window. Positive logits divide, the others multiply.
    wrapper = sloped(handles, [9, 5, 6, 7, 8], window=4, slope=0.5)
    logits = [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 3.0, -2.0, 1.0]
    left, _ = apply(wrapper.handle, list(range(10)), logits)
    after = dict(left)
    assert after[5] == pytest.approx(1.6)
    assert after[6] == pytest.approx(-1.25)
    assert after[7] == pytest.approx(2.0)
    assert after[8] == pytest.approx(-3.0)
    assert after[9] == 1.0
    assert [after[t] for t in range(5)] == [0.0] * 5


def test_a_token_in_both_halves_gets_the_full_penalty(handles: list[Any]) -> None:
    # Five tokens: positions 0-2 (5 7 5) are the older half, 3-4 (8 7) the newer.
    wrapper = sloped(handles, [5, 7, 5, 8, 7], window=8, slope=0.2)
    left, _ = apply(wrapper.handle, [5, 7, 8], [3.0, 3.0, 3.0])
    assert dict(left) == pytest.approx({5: 3.0 / 1.1, 7: 2.0, 8: 2.0})


def test_rep_pen_slope_matches_kobold_shuffled_and_after_wrapping(handles: list[Any]) -> None:
    rng = np.random.default_rng(11)
    history = rng.integers(0, 60, size=50).tolist()  # > 2 windows: the buffer wraps
    wrapper = sloped(handles, history, window=16, slope=0.7)
    for ids in (list(range(60)), rng.permutation(60).tolist()):  # row == id, and not
        logits = rng.normal(size=60).astype(np.float32).tolist()
        left, _ = apply(wrapper.handle, ids, logits)
        cands = list(zip(ids, logits, strict=True))
        assert dict(left) == pytest.approx(kobold_rep_pen(cands, history, 16, 1.5, 0.7))
        assert dict(left) != pytest.approx(kobold_rep_pen(cands, history, 16, 1.5, 1.0))


def test_chain_slopes_the_penalty_and_keeps_presence(handles: list[Any]) -> None:
    params = SamplingParams(
        temperature=0.0,
        repetition_penalty=2.0,
        repetition_penalty_slope=0.5,
        presence_penalty=0.25,
        penalty_range=4,
    )
    chain = build_sampler_chain(params, None, None, 8, 64, 1)
    handles.append(chain)
    chain.accept_history([1, 2, 3, 4])  # older half 1 2 (x1.5), newer 3 4 (x2)
    # 1: 3.0 / 1.5 - .25 = 1.75; 3: 3.6 / 2 - .25 = 1.55; 5 (unseen): 1.7. Greedy picks 1.
    assert chain.pick(np.array([0, 3.0, 0, 3.6, 0, 1.7, 0, 0], dtype=np.float32)) == 1
    # Without the slope 1 would be 3.0 / 2 - .25 = 1.25 and the unseen 5 would win.
    flat = build_sampler_chain(
        SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.25,
                       penalty_range=4),
        None, None, 8, 64, 1,
    )  # fmt: skip
    handles.append(flat)
    flat.accept_history([1, 2, 3, 4])
    assert flat.pick(np.array([0, 3.0, 0, 3.6, 0, 1.7, 0, 0], dtype=np.float32)) == 5


# ---- the chain: order, seeds, greedy-like top-a ----


def test_top_a_one_leaves_only_the_argmax_whatever_the_seed(handles: list[Any]) -> None:
    # p_max ~ 0.42 here: top-a 1 keeps tokens with p >= 0.18, i.e. only the argmax.
    logits = np.log(np.array([0.1, 0.42, 0.17, 0.16, 0.15], dtype=np.float32))
    picks = set()
    for seed in range(40):
        chain = build_sampler_chain(SamplingParams(top_a=1.0), None, None, 5, 64, seed)
        handles.append(chain)
        picks.add(chain.pick(logits))
    assert picks == {1}
    plain = set()
    for seed in range(40):
        chain = build_sampler_chain(SamplingParams(), None, None, 5, 64, seed)
        handles.append(chain)
        plain.add(chain.pick(logits))
    assert len(plain) >= 3  # without it, sampling really samples


def test_tail_free_in_the_chain_never_picks_the_tail(handles: list[Any]) -> None:
    logits = np.log(np.array([0.05, 0.35, 0.1, 0.3, 0.2], dtype=np.float32))
    picks = set()
    for seed in range(60):
        chain = build_sampler_chain(SamplingParams(tfs=0.6), None, None, 5, 64, seed)
        handles.append(chain)
        picks.add(chain.pick(logits))
    assert picks == {1, 3}  # the two likeliest (p .35, .3), as worked by hand above


# ---- dynatemp: llama.cpp's extended temperature, KoboldCpp's entropy formula ----


def kobold_dynatemp(
    logits: list[float], temp: float, spread: float, exponent: float
) -> list[float]:
    probs = [p for _, _, p in softmax_sorted(list(enumerate(logits)))]
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    normalized = entropy / math.log(len(logits))
    low, high = max(0.0, temp - spread), temp + spread
    dyn = low + (high - low) * normalized**exponent
    return [logit / dyn for logit in logits]


@pytest.mark.parametrize(("temp", "spread", "exponent"), [(1.0, 0.5, 1.0), (0.8, 0.6, 2.0)])
def test_dynatemp_scales_by_entropy_as_kobold(
    handles: list[Any], temp: float, spread: float, exponent: float
) -> None:
    params = SamplingParams(temperature=temp, dynatemp_range=spread, dynatemp_exponent=exponent)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in temperature_samplers(params, 5):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    handles.append(chain)
    logits = [2.0, 1.0, 0.5, -1.0, -3.0]
    left, _ = apply(chain, range(5), logits)
    got = {tid: logit for tid, logit in left}
    expected = kobold_dynatemp(logits, temp, spread, exponent)
    # Compare distributions: llama.cpp may shift logits by a constant.
    got_p = np.exp([got[t] for t in range(5)]) / np.exp([got[t] for t in range(5)]).sum()
    exp_p = np.exp(expected) / np.exp(expected).sum()
    assert got_p == pytest.approx(exp_p, rel=1e-4)
    plain = np.exp(np.array(logits) / temp) / np.exp(np.array(logits) / temp).sum()
    assert got_p != pytest.approx(plain, rel=1e-3)


def test_dynatemp_sees_the_likeliest_prefilter_as_kobold(handles: list[Any]) -> None:
    params = SamplingParams(temperature=1.0, dynatemp_range=0.8)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    n = KOBOLD_PREFILTER + 1000
    for sampler in temperature_samplers(params, n):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    handles.append(chain)
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=n) * 2).astype(np.float32)
    left, _ = apply(chain, range(n), logits.tolist())
    head = np.sort(np.argsort(-logits, kind="stable")[:KOBOLD_PREFILTER])
    assert sorted(tid for tid, _ in left) == head.tolist()
    got = dict(left)
    got_row = np.array([got[t] for t in head], dtype=np.float64)
    expected = np.array(kobold_dynatemp(logits[head].tolist(), 1.0, 0.8, 1.0))
    got_p = np.exp(got_row - got_row.max()) / np.exp(got_row - got_row.max()).sum()
    exp_p = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    assert got_p == pytest.approx(exp_p, rel=1e-3, abs=1e-9)


# ---- bounds ----


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_a", -0.1),
        ("top_a", 1.5),
        ("tfs", 1.01),
        ("tfs", -1.0),
        ("repetition_penalty_slope", 1.5),
        ("repetition_penalty_slope", float("nan")),
        ("dynatemp_range", -0.5),
        ("dynatemp_exponent", float("inf")),
    ],
)
def test_out_of_range_values_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field


def test_banned_tokens_never_survive_and_all_banned_is_left_to_the_pick(
    handles: list[Any],
) -> None:
    inf = float("-inf")
    for numpy_stage in (TopA(0.1), TailFree(0.9)):
        left, _ = apply(stage(handles, numpy_stage).handle, range(5), [1.0, inf, 0.9, inf, 0.8])
        assert {tid for tid, _ in left} <= {0, 2, 4}
        assert 0 in {tid for tid, _ in left}
        everything_banned, _ = apply(stage(handles, numpy_stage).handle, range(3), [inf] * 3)
        assert len(everything_banned) == 3
