"""Per-token cost of the Kobold sampler stages (rep_pen_slope, tfs, top_a) and dynatemp.

Two measurements, both in-process (no server, no network):

1. **Engine, 8 streams.** The real llama.cpp engine on the default model runs `--streams`
   concurrent sequences of `--tokens` tokens each (ignore_eos), once per configuration, the
   configurations interleaved in every round so machine load hits them alike. Per configuration:
   the median over rounds of its wall time / the same round's baseline (temperature 1, nothing
   else), and the extra milliseconds per engine step (one step samples every stream once).
2. **Stage alone.** Each stage applied through llama.cpp's sampler interface to a full-vocabulary
   candidate array (as the chain hands it over) `--calls` times: median microseconds per call,
   beside a no-op Python stage (the callback's own overhead) and llama.cpp's C samplers.

    .venv/bin/python bench/sampler_cost.py [--streams 8] [--tokens 64] [--rounds 5] [--json out]

Every run is bounded (rounds x configurations x streams x tokens; each round has a timeout) and
stops by itself. Note `uptime` before and after: the figures are ratios against the same round's
baseline because the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from llmserve.core.params import SamplingParams
from llmserve.core.request import GenerationRequest
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from llmserve.engines.llamacpp.sampling import (
    TOKEN_DATA,
    CandidateStage,
    CandidateView,
    PythonStage,
    SlopedRepetitionPenalty,
    TailFree,
    TopA,
    temperature_samplers,
)
from llmserve.models.defaults import default_model_path

BASE = SamplingParams(temperature=1.0, ignore_eos=True, penalty_range=1024)
CONFIGS: dict[str, SamplingParams] = {
    "baseline": BASE,
    "rep_pen (llama.cpp)": replace(BASE, repetition_penalty=1.1),
    "rep_pen + slope 0.7": replace(BASE, repetition_penalty=1.1, repetition_penalty_slope=0.7),
    "top_a 0.2": replace(BASE, top_a=0.2),
    "tfs 0.95": replace(BASE, tfs=0.95),
    "dynatemp 0.5 (llama.cpp)": replace(BASE, dynatemp_range=0.5),
    "SillyTavern (slope+tfs+top_p)": replace(
        BASE, repetition_penalty=1.1, repetition_penalty_slope=0.7, tfs=0.95, top_p=0.9
    ),
}
ROUND_TIMEOUT = 600.0  # seconds: a round that takes longer is abandoned
WORDS = ("river", "stone", "light", "garden", "window", "morning", "story", "music", "paper")


@dataclass
class EngineFigures:
    """Wall seconds per configuration, one entry per round."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        """Record one round's time."""
        self.seconds.setdefault(name, []).append(value)


class NoOp(CandidateStage):
    """Touches nothing: what the Python callback costs by itself."""

    def apply(self, view: CandidateView, is_sorted: bool) -> tuple[int, bool]:
        """Leave the candidates as they are."""
        return len(view), is_sorted


def prompts(engine: LlamaCppEngine, streams: int) -> list[list[int]]:
    """Distinct prompts of ~40 tokens, one per stream (no shared prefix)."""
    out = []
    for i in range(streams):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(32))
        out.append(engine.tokenize(f"Story {i}: {words}", add_special=True))
    return out


async def one_round(
    engine: LlamaCppEngine, params: SamplingParams, batch: list[list[int]], seed: int
) -> tuple[float, int]:
    """Run every prompt at once; wall seconds and tokens generated."""

    async def stream(prompt: list[int], index: int) -> int:
        request = GenerationRequest(
            f"bench-{uuid.uuid4().hex[:8]}", prompt, replace(params, seed=seed + index)
        )
        return sum([len(d.token_ids) async for d in engine.generate(request)])

    started = time.perf_counter()
    counts = await asyncio.wait_for(
        asyncio.gather(*(stream(p, i) for i, p in enumerate(batch))), ROUND_TIMEOUT
    )
    return time.perf_counter() - started, sum(counts)


async def engine_figures(args: argparse.Namespace) -> tuple[EngineFigures, int]:
    """Interleaved rounds over every configuration on one engine."""
    config = LlamaCppConfig(
        model_path=str(default_model_path()),
        model_id="bench",
        ctx_size=512,
        parallel=args.streams,
        n_threads=args.threads,
        n_threads_batch=args.threads,
    )
    engine = LlamaCppEngine.load(config)
    figures = EngineFigures()
    try:
        batch = prompts(engine, args.streams)
        await one_round(engine, replace(BASE, max_tokens=8), batch, 0)  # warm-up
        for number in range(args.rounds):
            for name, params in CONFIGS.items():
                seconds, tokens = await one_round(
                    engine, replace(params, max_tokens=args.tokens), batch, number
                )
                assert tokens == args.tokens * args.streams, (name, tokens)
                figures.add(name, seconds)
            print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        await engine.close()
    return figures, engine.info.vocab_size


def time_stage(apply: Callable[[], None], calls: int) -> float:
    """Median microseconds of `apply` over `calls` calls."""
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        apply()
        samples.append((time.perf_counter_ns() - started) / 1000)
    return statistics.median(samples)


def stage_figures(n_vocab: int, calls: int) -> dict[str, float]:
    """Median µs per call of each stage over a fresh full-vocabulary candidate array."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=n_vocab) * 3).astype(np.float32)
    history = rng.integers(0, n_vocab, size=1024).tolist()
    data = np.empty(n_vocab, dtype=TOKEN_DATA)
    samplers: dict[str, Any] = {}
    keep: list[PythonStage] = []

    def python(name: str, stage: CandidateStage) -> None:
        wrapper = PythonStage(name, stage)
        keep.append(wrapper)
        samplers[name] = wrapper.handle

    python("no-op Python stage", NoOp())
    sloped = SlopedRepetitionPenalty(1.1, 0.7, 1024)
    python("rep_pen slope 0.7, window 1024", sloped)
    for token in history:
        sloped.accept(token)
    python("top_a 0.2", TopA(0.2))
    python("tfs 0.95", TailFree(0.95))
    penalties = llama_cpp.llama_sampler_init_penalties(n_vocab, 1024, 1.1, 0.0, 0.0)
    for token in history:
        llama_cpp.llama_sampler_accept(penalties, token)
    samplers["llama.cpp penalties, window 1024"] = penalties
    samplers["llama.cpp top_p 0.9"] = llama_cpp.llama_sampler_init_top_p(0.9, 1)
    samplers["llama.cpp typical 0.9"] = llama_cpp.llama_sampler_init_typical(0.9, 1)
    samplers["llama.cpp temp_ext (dynatemp 0.5) alone"] = llama_cpp.llama_sampler_init_temp_ext(
        1.0, 0.5, 1.0
    )
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    for sampler in temperature_samplers(replace(BASE, dynatemp_range=0.5), n_vocab):
        llama_cpp.llama_sampler_chain_add(chain, sampler)
    samplers["dynatemp as served: top_k 3000 + temp_ext"] = chain
    figures: dict[str, float] = {}
    refill = time_stage(lambda: _refill(data, logits), calls)
    for name, handle in samplers.items():

        def apply(handle: Any = handle) -> None:
            data["id"] = np.arange(n_vocab, dtype=np.int32)
            data["logit"] = logits
            array = llama_cpp.llama_token_data_array(
                data.ctypes.data_as(llama_cpp.llama_token_data_p), n_vocab, -1, False
            )
            llama_cpp.llama_sampler_apply(handle, ctypes.byref(array))

        figures[name] = time_stage(apply, calls) - refill
    for handle in samplers.values():
        llama_cpp.llama_sampler_free(handle)
    return figures


def _refill(data: np.ndarray, logits: np.ndarray) -> None:
    """What every timed call also does (rebuild the array): subtracted from the figures."""
    data["id"] = np.arange(len(logits), dtype=np.int32)
    data["logit"] = logits
    llama_cpp.llama_token_data_array(
        data.ctypes.data_as(llama_cpp.llama_token_data_p), len(logits), -1, False
    )


def report(figures: EngineFigures, stages: dict[str, float], args: argparse.Namespace) -> str:
    """Markdown tables of both measurements."""
    base = figures.seconds["baseline"]
    steps = args.tokens
    lines = [
        f"engine: {args.streams} streams x {args.tokens} tokens, {args.rounds} interleaved rounds,"
        f" n_threads {args.threads}",
        "",
        "| configuration | time / baseline (median) | extra ms per step (median) |",
        "| --- | --- | --- |",
    ]
    for name, seconds in figures.seconds.items():
        ratios = [s / b for s, b in zip(seconds, base, strict=True)]
        extra = [(s - b) * 1000 / steps for s, b in zip(seconds, base, strict=True)]
        lines.append(
            f"| {name} | {statistics.median(ratios):.3f} | {statistics.median(extra):+.2f} |"
        )
    lines += [
        "",
        f"baseline step: {statistics.median(base) * 1000 / steps:.1f} ms (median)",
        "",
        "| stage, full-vocabulary candidates | µs per call (median) |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {us:.0f} |" for name, us in stages.items()]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for name, value in (("streams", args.streams), ("tokens", args.tokens)):
        if not 1 <= value <= 256:
            parser.error(f"--{name} must lie in 1..256")
    if not 1 <= args.rounds <= 50 or not 1 <= args.calls <= 10_000:
        parser.error("--rounds must lie in 1..50 and --calls in 1..10000")
    load_before = os.getloadavg()
    figures, n_vocab = asyncio.run(engine_figures(args))
    stages = stage_figures(n_vocab, args.calls)
    load_after = os.getloadavg()
    print(report(figures, stages, args))
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    if args.json:
        payload = {"engine_seconds": figures.seconds, "stage_us": stages, "args": vars(args)}
        args.json.write_text(json.dumps(payload, default=str, indent=2))


if __name__ == "__main__":
    main()
