"""How much a long echo + logprobs request stalls the other streams (loopback only).

K plain streams run; once each has produced a few tokens, one completions request with a long
prompt, `echo: true` and `logprobs: N` is sent (lm-eval's loglikelihood shape). The streams'
inter-token gaps that end while it runs are compared with the gaps of the same streams in an
equally long window without it. Each round measures both phases; medians over rounds:

    python bench/prompt_logprobs_stall.py --url http://127.0.0.1:8000/v1 --api-key KEY \\
        --streams 4 --prompt-tokens 1500 --logprobs 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

import load

WARM_TOKENS = 4  # tokens every stream must have produced before a window opens


@dataclass(frozen=True)
class StallConfig:
    """One run's settings."""

    url: str
    api_key: str | None
    model: str | None
    streams: int
    prompt_tokens: int
    logprobs: int
    rounds: int
    stream_max_tokens: int
    timeout: float
    seed: int


@dataclass
class StreamTrace:
    """Arrival times of one plain stream's content chunks."""

    arrivals: list[float] = field(default_factory=list)
    ended_at: float | None = None  # the stream finished by itself (max_tokens reached)

    def gaps_ending_in(self, start: float, end: float) -> list[float]:
        """Gaps between successive chunks whose later chunk arrived in [start, end]."""
        pairs = zip(self.arrivals, self.arrivals[1:], strict=False)
        return [later - earlier for earlier, later in pairs if start <= later <= end]


@dataclass(frozen=True)
class PhaseResult:
    """Gap statistics of one window, in milliseconds."""

    max_gap_ms: float
    p99_gap_ms: float
    gaps: int
    window_s: float
    streams_ended_early: int


@dataclass(frozen=True)
class RoundResult:
    """One round: the window with the echo request and the same-length window without it."""

    baseline: PhaseResult
    with_echo: PhaseResult
    echo_status: int
    echo_prompt_tokens: int | None


def headers(config: StallConfig) -> dict[str, str]:
    """Authorization header when a key is given."""
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def with_model(config: StallConfig, body: dict[str, Any]) -> dict[str, Any]:
    """`body` plus `model` when one is configured."""
    return {**body, "model": config.model} if config.model else body


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return ordered[rank]


async def plain_stream(
    client: httpx.AsyncClient, config: StallConfig, prompt: str, trace: StreamTrace
) -> None:
    """Stream one completion, recording when each content chunk arrives, until cancelled."""
    body = with_model(
        config,
        {
            "prompt": prompt,
            "max_tokens": config.stream_max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        },
    )
    url = config.url + "/completions"
    async with client.stream("POST", url, json=body, headers=headers(config)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                trace.arrivals.append(time.perf_counter())
    trace.ended_at = time.perf_counter()


async def echo_request(
    client: httpx.AsyncClient, config: StallConfig, prompt: str
) -> tuple[int, int | None]:
    """The long echo + logprobs request; its status and prompt token count."""
    body = with_model(
        config,
        {
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": config.logprobs,
        },
    )
    response = await client.post(
        config.url + "/completions", json=body, headers=headers(config), timeout=config.timeout
    )
    usage = response.json().get("usage", {}) if response.status_code == 200 else {}
    return response.status_code, usage.get("prompt_tokens")


async def wait_warm(traces: list[StreamTrace], tasks: list[asyncio.Task[None]]) -> None:
    """Until every stream has WARM_TOKENS chunks (a failed stream raises its error)."""
    while any(len(trace.arrivals) < WARM_TOKENS for trace in traces):
        for task in tasks:
            if task.done():
                task.result()
                raise load.BenchError("a plain stream ended before it was warm")
        await asyncio.sleep(0.01)


def phase_result(traces: list[StreamTrace], start: float, end: float) -> PhaseResult:
    """Pooled gap statistics of every stream over [start, end]."""
    gaps = [gap for trace in traces for gap in trace.gaps_ending_in(start, end)]
    early = sum(1 for trace in traces if trace.ended_at is not None and trace.ended_at < end)
    return PhaseResult(
        max_gap_ms=1000 * max(gaps, default=0.0),
        p99_gap_ms=1000 * percentile(gaps, 0.99),
        gaps=len(gaps),
        window_s=end - start,
        streams_ended_early=early,
    )


async def run_phase(
    client: httpx.AsyncClient, config: StallConfig, tag: str, echo_prompt: str | None, window: float
) -> tuple[PhaseResult, float, int, int | None]:
    """K streams; with `echo_prompt`, the window is the echo request, else `window` seconds."""
    prompts = [load.make_prompt(config.seed, f"{tag}-s{i}", 32) for i in range(config.streams)]
    traces = [StreamTrace() for _ in prompts]
    tasks = [
        asyncio.create_task(plain_stream(client, config, prompt, trace))
        for prompt, trace in zip(prompts, traces, strict=True)
    ]
    status, prompt_tokens = 0, None
    try:
        await wait_warm(traces, tasks)
        start = time.perf_counter()
        if echo_prompt is None:
            await asyncio.sleep(window)
        else:
            status, prompt_tokens = await echo_request(client, config, echo_prompt)
        end = time.perf_counter()
    finally:
        for task in tasks:
            task.cancel()  # hanging up ends the streams on the server too
        await asyncio.gather(*tasks, return_exceptions=True)
    return phase_result(traces, start, end), end - start, status, prompt_tokens


async def run_round(client: httpx.AsyncClient, config: StallConfig, index: int) -> RoundResult:
    """The echo phase first (it sets the window length), then the baseline phase."""
    tag = f"stall{config.seed}-r{index}"
    rng = random.Random(f"{config.seed}-{index}")
    echo_prompt = f"{tag}-echo " + load.word_text(rng, config.prompt_tokens)
    with_echo, window, status, prompt_tokens = await run_phase(
        client, config, tag + "-e", echo_prompt, 0.0
    )
    baseline, _, _, _ = await run_phase(client, config, tag + "-b", None, window)
    return RoundResult(baseline, with_echo, status, prompt_tokens)


async def run(config: StallConfig) -> list[RoundResult]:
    """Every round, one after another."""
    load.check_loopback(config.url)
    limits = httpx.Limits(max_connections=config.streams + 4)
    timeout = httpx.Timeout(config.timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        return [await run_round(client, config, i) for i in range(config.rounds)]


def report(results: list[RoundResult]) -> str:
    """A markdown table: one row per round, then the medians."""
    lines = [
        "| round | echo status | echo prompt tokens | window s | "
        "max gap ms without / with | p99 gap ms without / with | gaps without / with |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(results):
        lines.append(
            f"| {i} | {r.echo_status} | {r.echo_prompt_tokens} | {r.with_echo.window_s:.2f} | "
            f"{r.baseline.max_gap_ms:.0f} / {r.with_echo.max_gap_ms:.0f} | "
            f"{r.baseline.p99_gap_ms:.0f} / {r.with_echo.p99_gap_ms:.0f} | "
            f"{r.baseline.gaps} / {r.with_echo.gaps} |"
        )

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.0f}"

    lines.append(
        f"| median | | | {statistics.median(r.with_echo.window_s for r in results):.2f} | "
        f"{median([r.baseline.max_gap_ms for r in results])} / "
        f"{median([r.with_echo.max_gap_ms for r in results])} | "
        f"{median([r.baseline.p99_gap_ms for r in results])} / "
        f"{median([r.with_echo.p99_gap_ms for r in results])} | |"
    )
    early = sum(r.baseline.streams_ended_early + r.with_echo.streams_ended_early for r in results)
    if early:
        lines.append(
            f"\nwarning: {early} stream(s) ended inside a window: raise --stream-max-tokens"
        )
    return "\n".join(lines)


def parse_args() -> tuple[StallConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1"
    )
    parser.add_argument("--api-key")
    parser.add_argument("--model")
    parser.add_argument("--streams", type=int, default=4, help="plain streams running (K)")
    parser.add_argument("--prompt-tokens", type=int, default=1500, help="echo prompt, about")
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--stream-max-tokens", type=int, default=1000, help="long enough to outlast a window"
    )
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = StallConfig(
        url=args.url.rstrip("/"),
        api_key=args.api_key,
        model=args.model,
        streams=args.streams,
        prompt_tokens=args.prompt_tokens,
        logprobs=args.logprobs,
        rounds=args.rounds,
        stream_max_tokens=args.stream_max_tokens,
        timeout=args.timeout,
        seed=args.seed,
    )
    return config, args.json


def main() -> None:
    config, json_path = parse_args()
    results = asyncio.run(run(config))
    print(report(results))
    if json_path is not None:
        settings = {k: v for k, v in asdict(config).items() if k != "api_key"}
        payload = {"config": settings, "rounds": [asdict(r) for r in results]}
        json_path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
