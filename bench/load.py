"""Load generator for any OpenAI-compatible server on this machine (loopback only).

Streams completions or chat completions at fixed concurrency levels with fixed, deterministic
prompts and reports requests/s, output tokens/s, time to first token (TTFT), inter-token
latency (ITL) and errors per level:

    python bench/load.py --url http://127.0.0.1:8000/v1 --api-key KEY --concurrency 1 8 32

`ignore_eos: true` is sent by default so every request generates exactly `--max-tokens` tokens
on servers that honour it (llmserve, llama-server, vLLM). `--shared-prefix-tokens N` starts
every prompt with the same ~N-token system text and first measures the TTFT of the first
request against the median TTFT of sequential repeats: a prefix-cache check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
ENDPOINT_PATHS = {"completions": "completions", "chat": "chat/completions"}
# Prompt lengths cycle through these multiples of --prompt-tokens (mean 1.0).
LENGTH_FACTORS = (0.5, 1.0, 1.5, 0.75, 1.25)
# Common English words that are one token each in most BPE vocabularies (with a leading space),
# so a prompt of N words is roughly N tokens.
WORDS = (
    "the", "river", "house", "light", "stone", "garden", "window", "morning", "city", "road",
    "water", "tree", "market", "song", "paper", "table", "friend", "winter", "summer", "bread",
    "letter", "bridge", "school", "island", "forest", "horse", "music", "night", "street",
    "village", "teacher", "doctor", "rain", "wind", "mountain", "boat", "door", "book", "field",
    "story", "question", "answer", "little", "old", "new", "small", "great", "long", "early",
    "late", "quiet", "bright", "dark", "warm", "cold", "green", "blue", "red", "white", "black",
    "walked", "found", "said", "came", "made", "looked", "gave", "took", "left", "called",
    "and", "but", "with", "from", "under", "over", "near", "after", "before", "because", "when",
    "every", "some", "many", "other", "first", "last", "again", "never", "always", "often",
)  # fmt: skip


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, warm-up failed)."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run is told."""

    url: str
    api_key: str | None = None
    model: str | None = None
    endpoint: str = "completions"
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int | None = None
    prompt_tokens: int = 128
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    min_tokens: bool = False
    timeout: float = 120.0
    shared_prefix_tokens: int = 0
    prefix_repeats: int = 8
    warmup: int = 1
    seed: int = 0
    seed_probe: int = 0
    server_pid: int | None = None  # a server on this machine: its CPU time per level is read
    decode_threads: int | None = None  # its llama.cpp threads, to split llmserve's CPU time

    def requests_for(self, concurrency: int) -> int:
        """Requests sent at one level: --requests, else 2 × concurrency but at least 8."""
        return self.requests if self.requests else max(2 * concurrency, 8)


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    ok: bool
    error: str | None = None
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency: float = 0.0
    cancelled: bool = False


@dataclass
class LevelSummary:
    """One concurrency level's figures; times in milliseconds."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    error_kinds: dict[str, int]
    wall_s: float
    req_per_s: float
    out_tok_per_s: float
    output_tokens: int
    tokens_per_req: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    engine: EngineTime | None = None
    cpu_s: float | None = None  # the server process's CPU time (all threads) over the level


@dataclass(frozen=True)
class EngineTime:
    """llmserve's own engine counters over one level (from /metrics; None for other servers)."""

    steps: int
    busy_s: float
    decode_s: float

    @property
    def mean_step_ms(self) -> float:
        """Mean time of one engine step."""
        return self.busy_s / self.steps * 1000 if self.steps else 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the engine's busy time spent outside llama_decode."""
        return (self.busy_s - self.decode_s) / self.busy_s if self.busy_s > 0 else 0.0

    def minus(self, before: EngineTime) -> EngineTime:
        """The counters' growth since `before`."""
        return EngineTime(
            self.steps - before.steps, self.busy_s - before.busy_s, self.decode_s - before.decode_s
        )


@dataclass
class PrefixSummary:
    """Shared-prefix probe: TTFT of the first request against the median of repeats."""

    prefix_tokens: int
    first_ttft_ms: float | None
    repeat_ttft_p50_ms: float | None
    repeats_ok: int
    repeats: int
    errors: dict[str, int]


@dataclass
class SeedSummary:
    """Seeded sampling: do repeats alone agree, and do copies sent all at once agree?"""

    solo_runs: int
    solo_agree: int  # solo repeats whose text equals the first solo run's
    other_seed_differs: bool  # a different seed gave a different text
    concurrent_runs: int
    concurrent_agree: int  # copies sent together whose text equals the first solo run's
    errors: dict[str, int]


@dataclass
class BenchResult:
    """A whole run."""

    config: dict[str, Any]
    levels: list[LevelSummary]
    prefix: PrefixSummary | None = None
    seeds: SeedSummary | None = None


# ----------------------------------------------------------------------------- prompts


def check_loopback(url: str) -> None:
    """Refuse anything but http(s) on 127.0.0.1, localhost or ::1."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing {url!r}: only http(s) on 127.0.0.1, localhost or ::1")


def word_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of words from WORDS, a full stop (one more token) every 12 words."""
    words = [rng.choice(WORDS) for _ in range(max(1, round(tokens * 12 / 13)))]
    for i in range(11, len(words), 12):
        words[i] += "."
    return " ".join(words)


def make_prompt(seed: int, tag: str, tokens: int) -> str:
    """A deterministic prompt of roughly `tokens` tokens; `tag` makes it unique."""
    rng = random.Random(f"{seed}:{tag}")
    head = f"Request {tag}. Continue this text:"
    return f"{head} {word_text(rng, tokens - 12)}"


def shared_prefix_text(seed: int, tokens: int) -> str:
    """The ~`tokens`-token system text every prompt starts with in shared-prefix mode."""
    rng = random.Random(f"{seed}:shared-prefix")
    head = "You are a careful assistant. Keep these reference notes in mind:"
    return f"{head} {word_text(rng, tokens - 14)}"


def prompt_length(mean_tokens: int, index: int) -> int:
    """Length of the index-th prompt: cycles through LENGTH_FACTORS × the mean."""
    return round(mean_tokens * LENGTH_FACTORS[index % len(LENGTH_FACTORS)])


def level_prompts(cfg: BenchConfig, concurrency: int) -> list[str]:
    """The prompts of one level: varied lengths, unique per level and index."""
    return [
        make_prompt(cfg.seed, f"c{concurrency}-r{i}", prompt_length(cfg.prompt_tokens, i))
        for i in range(cfg.requests_for(concurrency))
    ]


def request_body(
    cfg: BenchConfig, endpoint: str, prompt: str, system: str | None, stream: bool = True
) -> dict[str, Any]:
    """An OpenAI completions or chat body for `prompt` (after `system`, if any)."""
    body: dict[str, Any] = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if cfg.model:
        body["model"] = cfg.model
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.min_tokens:
        body["min_tokens"] = cfg.max_tokens
    if endpoint == "chat":
        system_msgs = [{"role": "system", "content": system}] if system else []
        body["messages"] = [*system_msgs, {"role": "user", "content": prompt}]
    else:
        body["prompt"] = f"{system}\n\n{prompt}" if system else prompt
    return body


# ----------------------------------------------------------------------------- one request


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in one streamed chunk (completions `text` or chat `delta.content`)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


class StreamTracker:
    """Consumes SSE lines of one response and times its content chunks."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self.last: float | None = None
        self.itls: list[float] = []
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, line: str, now: float) -> bool:
        """Take one SSE line; True when the stream is over ([DONE] or an error event)."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            self.error = "bad_sse_json"
            return True
        if not isinstance(chunk, dict) or chunk.get("error"):
            self.error = "stream_error_event"
            return True
        self._take(chunk, now)
        return False

    def _take(self, chunk: dict[str, Any], now: float) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        if not chunk_text(chunk):
            return
        if self.last is None:
            self.first = now
        else:
            self.itls.append(now - self.last)
        self.last = now
        self.chunks += 1

    def result(self, now: float, cancelled: bool = False) -> RequestResult:
        """The request's result once the stream ended (or was cut by us)."""
        error = self.error
        if error is None and not self.done and not cancelled:
            error = "stream_ended_without_done"
        return RequestResult(
            ok=error is None,
            error=error,
            ttft=None if self.first is None else self.first - self.start,
            itls=self.itls,
            output_tokens=self.usage_tokens if self.usage_tokens is not None else self.chunks,
            latency=now - self.start,
            cancelled=cancelled,
        )


def failure(kind: str, start: float) -> RequestResult:
    """A failed request's result."""
    return RequestResult(ok=False, error=kind, latency=time.perf_counter() - start)


def exception_kind(exc: BaseException) -> str:
    """Error kind of an exception raised by a request."""
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    return f"exception_{type(exc).__name__}"


async def _consume(
    response: httpx.Response, tracker: StreamTracker, stop_after: int | None
) -> bool:
    """Read SSE lines until the stream ends; True if we stopped after `stop_after` chunks."""
    async for line in response.aiter_lines():
        if tracker.feed(line, time.perf_counter()):
            return False
        if stop_after is not None and tracker.chunks >= stop_after:
            return True
    return False


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    timeout: float,
    stop_after: int | None = None,
) -> RequestResult:
    """POST one streaming request and time it; with `stop_after`, hang up after that many
    content chunks (a client cancelling mid-stream)."""
    start = time.perf_counter()
    tracker = StreamTracker(start)
    try:
        async with asyncio.timeout(timeout), client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return failure(f"http_{response.status_code}", start)
            cancelled = await _consume(response, tracker, stop_after)
    except (TimeoutError, httpx.HTTPError) as exc:
        return failure(exception_kind(exc), start)
    return tracker.result(time.perf_counter(), cancelled)


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(value: float | None) -> float | None:
    """Seconds to milliseconds, keeping None."""
    return None if value is None else value * 1000


def summarize(concurrency: int, results: list[RequestResult], wall: float) -> LevelSummary:
    """Figures of one level from its requests' results and wall time."""
    good = [r for r in results if r.ok]
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [itl for r in good for itl in r.itls]
    tokens = sum(r.output_tokens for r in good)
    kinds = Counter(r.error for r in results if r.error)
    return LevelSummary(
        concurrency=concurrency,
        requests=len(results),
        ok=len(good),
        errors=len(results) - len(good),
        error_kinds=dict(kinds),
        wall_s=wall,
        req_per_s=len(good) / wall if wall > 0 else 0.0,
        out_tok_per_s=tokens / wall if wall > 0 else 0.0,
        output_tokens=tokens,
        tokens_per_req=tokens / len(good) if good else 0.0,
        ttft_p50_ms=ms(percentile(ttfts, 50)),
        ttft_p99_ms=ms(percentile(ttfts, 99)),
        itl_p50_ms=ms(percentile(itls, 50)),
        itl_p99_ms=ms(percentile(itls, 99)),
    )


# ----------------------------------------------------------------------------- running


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    """One HTTP client for the run: enough connections for the highest level, no proxies."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    slots = max(*cfg.concurrency, cfg.seed_probe) + 4
    return httpx.AsyncClient(
        base_url=cfg.url.rstrip("/") + "/",
        headers=headers,
        limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
        timeout=httpx.Timeout(cfg.timeout),
        trust_env=False,
    )


ENGINE_METRICS = {
    "llmserve_engine_steps_total": "steps",
    "llmserve_engine_busy_seconds_total": "busy_s",
    "llmserve_engine_decode_seconds_total": "decode_s",
}


def parse_engine_time(metrics_text: str) -> EngineTime | None:
    """llmserve's engine counters from a Prometheus text page, summed over models."""
    totals = dict.fromkeys(ENGINE_METRICS.values(), 0.0)
    seen = False
    for line in metrics_text.splitlines():
        name, _, rest = line.partition("{")
        field_name = ENGINE_METRICS.get(name.strip())
        if field_name is None or not rest:
            continue
        totals[field_name] += float(rest.rsplit(" ", 1)[-1])
        seen = True
    if not seen:
        return None
    return EngineTime(int(totals["steps"]), totals["busy_s"], totals["decode_s"])


async def read_engine_time(client: httpx.AsyncClient, cfg: BenchConfig) -> EngineTime | None:
    """The engine counters from the server's /metrics, if it is llmserve (else None)."""
    parts = urlsplit(cfg.url)
    try:
        response = await client.get(f"{parts.scheme}://{parts.netloc}/metrics")
    except httpx.HTTPError:
        return None
    return parse_engine_time(response.text) if response.status_code == 200 else None


async def run_level(
    client: httpx.AsyncClient, cfg: BenchConfig, concurrency: int, system: str | None
) -> LevelSummary:
    """Send one level's prompts with `concurrency` clients in a closed loop."""
    path = ENDPOINT_PATHS[cfg.endpoint]
    pending = list(reversed(level_prompts(cfg, concurrency)))
    results: list[RequestResult] = []

    async def worker() -> None:
        while pending:
            body = request_body(cfg, cfg.endpoint, pending.pop(), system)
            results.append(await stream_request(client, path, body, cfg.timeout))

    engine_before = await read_engine_time(client, cfg)
    cpu_before = process_cpu_s(cfg.server_pid)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    summary = summarize(concurrency, results, time.perf_counter() - start)
    cpu_after = process_cpu_s(cfg.server_pid)
    engine_after = await read_engine_time(client, cfg)
    if engine_before is not None and engine_after is not None:
        summary.engine = engine_after.minus(engine_before)
    if cpu_before is not None and cpu_after is not None:
        summary.cpu_s = cpu_after - cpu_before
    return summary


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds so far of process `pid` and every process it started (vLLM's
    engine core and workers run in children), all threads; None: unknown."""
    if pid is None:
        return None
    own = _own_cpu_s(pid)
    if own is None:
        return None
    return own + sum(_own_cpu_s(kid) or 0.0 for kid in child_pids(pid))


def _own_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: utime and stime are fields 14 and 15 of the whole line.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The PIDs of `pid`'s children, grandchildren, ... (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


async def warm_up(client: httpx.AsyncClient, cfg: BenchConfig) -> None:
    """Send `cfg.warmup` short requests (no shared prefix); raise BenchError if one fails."""
    path = ENDPOINT_PATHS[cfg.endpoint]
    for i in range(cfg.warmup):
        prompt = make_prompt(cfg.seed, f"warmup-{i}", 24)
        result = await stream_request(
            client, path, request_body(cfg, cfg.endpoint, prompt, None), cfg.timeout
        )
        if not result.ok:
            raise BenchError(f"warm-up request to {cfg.url} failed: {result.error}")


async def prefix_probe(client: httpx.AsyncClient, cfg: BenchConfig, system: str) -> PrefixSummary:
    """Sequential requests sharing `system`: the first fills the prefix cache, repeats hit it."""
    path = ENDPOINT_PATHS[cfg.endpoint]
    results = []
    for i in range(cfg.prefix_repeats + 1):
        prompt = make_prompt(cfg.seed, f"prefix-{i}", cfg.prompt_tokens)
        body = request_body(cfg, cfg.endpoint, prompt, system)
        results.append(await stream_request(client, path, body, cfg.timeout))
    first, repeats = results[0], results[1:]
    repeat_ttfts = [r.ttft for r in repeats if r.ok and r.ttft is not None]
    return PrefixSummary(
        prefix_tokens=cfg.shared_prefix_tokens,
        first_ttft_ms=ms(first.ttft) if first.ok else None,
        repeat_ttft_p50_ms=ms(percentile(repeat_ttfts, 50)),
        repeats_ok=sum(r.ok for r in repeats),
        repeats=len(repeats),
        errors=dict(Counter(r.error for r in results if r.error)),
    )


SEED_PROBE_SOLO_RUNS = 3
SEED_PROBE_TEMPERATURE = 0.8


def response_text(body: dict[str, Any]) -> str:
    """The first choice's text of a non-streamed completion or chat completion."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    return str(choice.get("text") or message.get("content") or "")


async def seeded_text(client: httpx.AsyncClient, cfg: BenchConfig, seed: int) -> str | None:
    """One non-streamed seeded request; None if it failed."""
    prompt = make_prompt(cfg.seed, "seeded", cfg.prompt_tokens)
    body = request_body(cfg, cfg.endpoint, prompt, None, stream=False)
    body.update(temperature=SEED_PROBE_TEMPERATURE, seed=seed)
    try:
        response = await client.post(ENDPOINT_PATHS[cfg.endpoint], json=body)
    except httpx.HTTPError:
        return None
    return response_text(response.json()) if response.status_code == 200 else None


async def seed_probe(client: httpx.AsyncClient, cfg: BenchConfig) -> SeedSummary:
    """The same seeded request alone a few times, with another seed, then N copies at once."""
    solo = [await seeded_text(client, cfg, 1234) for _ in range(SEED_PROBE_SOLO_RUNS)]
    other = await seeded_text(client, cfg, 4321)
    together = await asyncio.gather(
        *(seeded_text(client, cfg, 1234) for _ in range(cfg.seed_probe))
    )
    reference = solo[0]
    failed = sum(text is None for text in [*solo, other, *together])
    return SeedSummary(
        solo_runs=len(solo),
        solo_agree=sum(text is not None and text == reference for text in solo),
        other_seed_differs=other is not None and other != reference,
        concurrent_runs=len(together),
        concurrent_agree=sum(text is not None and text == reference for text in together),
        errors={"failed": failed} if failed else {},
    )


def log(message: str) -> None:
    """Progress goes to stderr, results to stdout."""
    print(message, file=sys.stderr, flush=True)


async def run_benchmark(cfg: BenchConfig) -> BenchResult:
    """Warm up, run the shared-prefix probe if asked, then every concurrency level in order."""
    check_loopback(cfg.url)
    system = (
        shared_prefix_text(cfg.seed, cfg.shared_prefix_tokens) if cfg.shared_prefix_tokens else None
    )
    result = BenchResult(config=asdict(cfg), levels=[])
    result.config.pop("api_key", None)
    async with make_client(cfg) as client:
        await warm_up(client, cfg)
        if system is not None:
            log(f"shared-prefix probe: 1 + {cfg.prefix_repeats} sequential requests")
            result.prefix = await prefix_probe(client, cfg, system)
        if cfg.seed_probe:
            log(f"seed probe: {SEED_PROBE_SOLO_RUNS} + 1 solo requests, {cfg.seed_probe} at once")
            result.seeds = await seed_probe(client, cfg)
        for concurrency in cfg.concurrency:
            log(f"concurrency {concurrency}: {cfg.requests_for(concurrency)} requests")
            result.levels.append(await run_level(client, cfg, concurrency, system))
    return result


# ----------------------------------------------------------------------------- reporting

TABLE_HEADER = (
    "conc", "reqs", "req/s", "out tok/s", "tok/req",
    "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors",
)  # fmt: skip


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table cell; '–' for missing."""
    return "–" if value is None else f"{value:.{digits}f}"


def level_cells(level: LevelSummary) -> list[str]:
    """One level as table cells, in TABLE_HEADER order."""
    return [
        str(level.concurrency),
        str(level.requests),
        fmt(level.req_per_s, 2),
        fmt(level.out_tok_per_s),
        fmt(level.tokens_per_req),
        fmt(level.ttft_p50_ms),
        fmt(level.ttft_p99_ms),
        fmt(level.itl_p50_ms),
        fmt(level.itl_p99_ms),
        str(level.errors),
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with right-aligned columns."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def error_lines(levels: Sequence[LevelSummary]) -> list[str]:
    """One line per level that had errors, naming their kinds."""
    return [
        f"concurrency {lv.concurrency}: "
        + ", ".join(f"{kind} ×{n}" for kind, n in sorted(lv.error_kinds.items()))
        for lv in levels
        if lv.error_kinds
    ]


def engine_lines(levels: Sequence[LevelSummary], decode_threads: int | None = None) -> list[str]:
    """Per level: the server's CPU per output token; llmserve's engine steps and their split."""
    lines = []
    for lv in levels:
        parts = []
        if lv.cpu_s is not None and lv.output_tokens:
            parts.append(
                f"process CPU {lv.cpu_s:.1f} s ({lv.cpu_s / lv.output_tokens * 1000:.1f} ms "
                "per output token)"
            )
        # Step time is llama.cpp's (the vLLM engine counts steps but times none).
        if lv.engine is not None and lv.engine.steps and lv.engine.busy_s > 0:
            parts.append(
                f"{lv.engine.steps} engine steps, mean {lv.engine.mean_step_ms:.1f} ms, "
                f"{lv.engine.overhead_share:.1%} of step time outside llama_decode"
            )
            outside = outside_decode_share(lv, decode_threads)
            if outside is not None:
                parts.append(f"{outside:.1%} of the process's CPU outside llama_decode")
        if parts:
            lines.append(f"concurrency {lv.concurrency}: " + "; ".join(parts))
    return lines


def outside_decode_share(level: LevelSummary, decode_threads: int | None) -> float | None:
    """Share of the whole process's CPU time not spent by llama.cpp's threads in llama_decode.

    Every thread counts (HTTP, event loop, database, sampling on the engine thread); decode
    time is charged `decode_threads` times, once per llama.cpp thread working in it.
    """
    if level.cpu_s is None or level.engine is None or not decode_threads or level.cpu_s <= 0:
        return None
    inside = min(level.cpu_s, level.engine.decode_s * decode_threads)
    return (level.cpu_s - inside) / level.cpu_s


def prefix_line(prefix: PrefixSummary) -> str:
    """The shared-prefix probe in one line."""
    first, repeat = prefix.first_ttft_ms, prefix.repeat_ttft_p50_ms
    ratio = f" ({first / repeat:.1f}× faster)" if first and repeat else ""
    return (
        f"shared prefix ~{prefix.prefix_tokens} tokens: first TTFT {fmt(first)} ms, "
        f"repeat TTFT p50 {fmt(repeat)} ms{ratio} "
        f"[{prefix.repeats_ok}/{prefix.repeats} repeats ok]"
    )


def seed_line(seeds: SeedSummary) -> str:
    """The seed probe in one line."""
    errors = f", {seeds.errors['failed']} failed" if seeds.errors else ""
    return (
        f"seeded sampling (temperature {SEED_PROBE_TEMPERATURE}): {seeds.solo_agree}/"
        f"{seeds.solo_runs} solo runs agree, another seed "
        f"{'differs' if seeds.other_seed_differs else 'gives the same text'}; "
        f"{seeds.concurrent_agree}/{seeds.concurrent_runs} copies sent at once agree with the "
        f"solo run{errors}"
    )


def report(result: BenchResult) -> str:
    """The printed report: levels table, error kinds, prefix probe."""
    parts = [markdown_table(TABLE_HEADER, [level_cells(lv) for lv in result.levels])]
    parts += error_lines(result.levels)
    parts += engine_lines(result.levels, result.config.get("decode_threads"))
    if result.prefix:
        parts.append(prefix_line(result.prefix))
    if result.seeds:
        parts.append(seed_line(result.seeds))
    return "\n".join(parts)


def result_json(result: BenchResult) -> str:
    """The run as JSON."""
    return json.dumps(asdict(result), indent=2)


def proc_status_kb(pid: int, key: str) -> int | None:
    """A kB figure (VmRSS, VmHWM) from /proc/PID/status; None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    return None


# ----------------------------------------------------------------------------- command line


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with run_side_by_side.py: what to send, how much, how long to wait."""
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests", type=int, help="requests per level (default: 2 × concurrency, at least 8)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128, help="approximate, mean")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--no-ignore-eos", dest="ignore_eos", action="store_false", help="don't send ignore_eos"
    )
    parser.add_argument(
        "--min-tokens",
        action="store_true",
        help="also send min_tokens = max tokens (for servers that ignore ignore_eos)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument(
        "--shared-prefix-tokens", type=int, default=0, help="prefix-cache mode: shared system text"
    )
    parser.add_argument("--prefix-repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    parser.add_argument(
        "--seed-probe",
        type=int,
        default=0,
        metavar="N",
        help="seeded-sampling agreement: solo repeats, then N copies at once",
    )
    parser.add_argument("--seed", type=int, default=0, help="varies every prompt")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")


def workload_config(
    args: argparse.Namespace, url: str, api_key: str | None, model: str | None
) -> BenchConfig:
    """A BenchConfig from parsed workload flags (`model` is the name sent, if any)."""
    return BenchConfig(
        url=url,
        api_key=api_key,
        model=model,
        endpoint=args.endpoint,
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        min_tokens=args.min_tokens,
        timeout=args.timeout,
        shared_prefix_tokens=args.shared_prefix_tokens,
        prefix_repeats=args.prefix_repeats,
        warmup=args.warmup,
        seed=args.seed,
        seed_probe=args.seed_probe,
    )


def validate(cfg: BenchConfig) -> None:
    """Reject settings that would make a run unbounded or meaningless."""
    check_loopback(cfg.url)
    if min(cfg.concurrency) < 1 or cfg.max_tokens < 1 or cfg.prompt_tokens < 16:
        raise ValueError("need concurrency >= 1, max tokens >= 1 and prompt tokens >= 16")
    if cfg.timeout <= 0 or (cfg.requests is not None and cfg.requests < 1):
        raise ValueError("need a positive timeout and at least one request per level")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="model name to send (default: none, server's default)")
    parser.add_argument(
        "--server-pid", type=int, help="the server's PID on this machine: report its CPU time"
    )
    parser.add_argument(
        "--decode-threads", type=int, help="its llama.cpp threads (llmserve's CPU split)"
    )
    add_workload_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = workload_config(args, args.url, args.api_key, args.model)
    cfg = replace(cfg, server_pid=args.server_pid, decode_threads=args.decode_threads)
    try:
        validate(cfg)
        result = asyncio.run(run_benchmark(cfg))
    except (ValueError, BenchError) as exc:
        raise SystemExit(f"load.py: {exc}") from exc
    print(report(result))
    if args.json:
        args.json.write_text(result_json(result) + "\n")


if __name__ == "__main__":
    main()
