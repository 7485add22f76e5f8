"""Bounded soak test of a running llmserve on this machine (loopback only).

C clients send a mix of streaming, non-streaming and cancelled-mid-stream requests (to
/v1/completions and /v1/chat/completions) for N minutes, while the server's RSS is read from
/proc/PID/status every few seconds. Reports requests, errors by kind, latency percentiles and
RSS growth between the end of warm-up and the end of the run; exit status 1 if the
server process died or its /health no longer answers 200:

    python bench/soak.py --url http://127.0.0.1:8000/v1 --api-key KEY --pid 12345 --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

import load

KINDS = ("stream", "nonstream", "cancel")
ERROR_BACKOFF_S = 0.2


@dataclass(frozen=True)
class SoakConfig:
    """Everything one soak run is told."""

    url: str
    api_key: str | None = None
    model: str | None = None
    minutes: float = 5.0
    clients: int = 8
    pid: int | None = None
    rss_interval: float = 5.0
    max_tokens: int = 32
    prompt_tokens: int = 64
    temperature: float = 0.7
    timeout: float = 60.0
    weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    warmup_s: float | None = None
    report_every: float = 30.0
    seed: int = 0

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def warmup_end_s(self) -> float:
        """End of warm-up: --warmup-seconds, else the first minute or 20%, whichever is sooner."""
        if self.warmup_s is not None:
            return self.warmup_s
        return min(60.0, 0.2 * self.duration_s)

    def bench(self) -> load.BenchConfig:
        """The load generator's view (body fields, client limits); EOS is honoured here."""
        return load.BenchConfig(
            url=self.url,
            api_key=self.api_key,
            model=self.model,
            concurrency=(self.clients,),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            ignore_eos=False,
            timeout=self.timeout,
        )


@dataclass
class SoakStats:
    """Running totals; one object per run, filled by the client tasks."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    rss: list[tuple[float, int]] = field(default_factory=list)
    server_gone: bool = False

    def add(self, kind: str, result: load.RequestResult) -> None:
        self.sent[kind] += 1
        if result.ok:
            self.ok[kind] += 1
            self.latencies[kind].append(result.latency)
        else:
            self.errors[f"{kind}:{result.error}"] += 1


@dataclass
class KindSummary:
    kind: str
    sent: int
    ok: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class SoakReport:
    """A whole soak run; RSS in MB."""

    config: dict[str, object]
    elapsed_s: float
    requests: int
    errors: int
    error_kinds: dict[str, int]
    kinds: list[KindSummary]
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    rss_start_mb: float | None
    rss_warm_mb: float | None
    rss_end_mb: float | None
    rss_max_mb: float | None
    rss_growth_mb: float | None
    server_gone: bool
    health_at_end: int | None


# ----------------------------------------------------------------------------- requests


async def plain_request(
    client: httpx.AsyncClient, path: str, body: dict[str, object], timeout: float
) -> load.RequestResult:
    """POST one non-streaming request; ok when it answers 200 with choices."""
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            response = await client.post(path, json=body)
    except (TimeoutError, httpx.HTTPError) as exc:
        return load.failure(load.exception_kind(exc), start)
    if response.status_code != 200:
        return load.failure(f"http_{response.status_code}", start)
    try:
        data = response.json()
    except ValueError:
        return load.failure("bad_json", start)
    if not isinstance(data, dict) or not data.get("choices"):
        return load.failure("no_choices", start)
    tokens = (data.get("usage") or {}).get("completion_tokens") or 0
    return load.RequestResult(
        ok=True, output_tokens=int(tokens), latency=time.perf_counter() - start
    )


async def one_request(
    client: httpx.AsyncClient, cfg: SoakConfig, kind: str, prompt: str, rng: random.Random
) -> load.RequestResult:
    """Send one request of `kind` to a randomly chosen endpoint."""
    endpoint = rng.choice(("completions", "chat"))
    path = load.ENDPOINT_PATHS[endpoint]
    bench = cfg.bench()
    if kind == "nonstream":
        body = load.request_body(bench, endpoint, prompt, None, stream=False)
        return await plain_request(client, path, body, cfg.timeout)
    body = load.request_body(bench, endpoint, prompt, None)
    stop_after = rng.randint(1, max(1, cfg.max_tokens // 2)) if kind == "cancel" else None
    return await load.stream_request(client, path, body, cfg.timeout, stop_after)


async def client_loop(
    client: httpx.AsyncClient, cfg: SoakConfig, index: int, stats: SoakStats, stop: asyncio.Event
) -> None:
    """One client: request after request until `stop` is set; a short pause after an error."""
    rng = random.Random(f"{cfg.seed}:client-{index}")
    n = 0
    while not stop.is_set():
        kind = rng.choices(KINDS, weights=cfg.weights)[0]
        length = load.prompt_length(cfg.prompt_tokens, n)
        prompt = load.make_prompt(cfg.seed, f"soak-{index}-{n}", length)
        result = await one_request(client, cfg, kind, prompt, rng)
        stats.add(kind, result)
        n += 1
        if not result.ok:
            await asyncio.sleep(ERROR_BACKOFF_S)


# ----------------------------------------------------------------------------- background tasks


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds` or until `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def sample_rss(pid: int, stats: SoakStats, t0: float) -> bool:
    """Record the server's VmRSS now; False if the process is gone."""
    kb = load.proc_status_kb(pid, "VmRSS")
    if kb is None:
        stats.server_gone = True
        return False
    stats.rss.append((time.monotonic() - t0, kb))
    return True


async def rss_sampler(
    cfg: SoakConfig, pid: int, stats: SoakStats, stop: asyncio.Event, t0: float
) -> None:
    """Sample RSS every interval; stop the run if the server process disappears."""
    while not stop.is_set():
        if not sample_rss(pid, stats, t0):
            load.log(f"server process {pid} is gone: stopping")
            stop.set()
            return
        await pause(stop, cfg.rss_interval)


def progress_line(stats: SoakStats, elapsed: float) -> str:
    """One progress line: time, requests, errors, latest RSS."""
    rss = f", RSS {stats.rss[-1][1] / 1024:.1f} MB" if stats.rss else ""
    return f"t={elapsed:5.0f} s: {stats.sent.total()} requests, {stats.errors.total()} errors{rss}"


async def progress(cfg: SoakConfig, stats: SoakStats, stop: asyncio.Event, t0: float) -> None:
    """Log a progress line every `report_every` seconds."""
    while not stop.is_set():
        await pause(stop, cfg.report_every)
        load.log(progress_line(stats, time.monotonic() - t0))


async def timer(seconds: float, stop: asyncio.Event) -> None:
    """Set `stop` after `seconds`."""
    await pause(stop, seconds)
    stop.set()


async def health_status(client: httpx.AsyncClient, url: str) -> int | None:
    """Status of GET /health at the server root; None if nothing answers."""
    parts = urlsplit(url)
    try:
        return (await client.get(f"{parts.scheme}://{parts.netloc}/health", timeout=10)).status_code
    except httpx.HTTPError:
        return None


# ----------------------------------------------------------------------------- run and report


def rss_at(samples: list[tuple[float, int]], t: float) -> float | None:
    """MB of the first sample taken at or after `t` seconds; None if there is none."""
    later = [kb for when, kb in samples if when >= t]
    return later[0] / 1024 if later else None


def summarize(cfg: SoakConfig, stats: SoakStats, elapsed: float, health: int | None) -> SoakReport:
    """The report of a finished run."""
    kinds = [
        KindSummary(
            kind=k,
            sent=stats.sent[k],
            ok=stats.ok[k],
            p50_ms=load.ms(load.percentile(stats.latencies[k], 50)),
            p99_ms=load.ms(load.percentile(stats.latencies[k], 99)),
        )
        for k in KINDS
    ]
    completed = stats.latencies["stream"] + stats.latencies["nonstream"]
    warm = rss_at(stats.rss, cfg.warmup_end_s)
    end = stats.rss[-1][1] / 1024 if stats.rss else None
    config = asdict(cfg)
    config.pop("api_key", None)
    return SoakReport(
        config=config,
        elapsed_s=elapsed,
        requests=stats.sent.total(),
        errors=stats.errors.total(),
        error_kinds=dict(stats.errors),
        kinds=kinds,
        latency_p50_ms=load.ms(load.percentile(completed, 50)),
        latency_p99_ms=load.ms(load.percentile(completed, 99)),
        rss_start_mb=stats.rss[0][1] / 1024 if stats.rss else None,
        rss_warm_mb=warm,
        rss_end_mb=end,
        rss_max_mb=max(kb for _, kb in stats.rss) / 1024 if stats.rss else None,
        rss_growth_mb=None if warm is None or end is None else end - warm,
        server_gone=stats.server_gone,
        health_at_end=health,
    )


async def run_soak(cfg: SoakConfig) -> SoakReport:
    """Run the clients, RSS sampler and progress log until the time is up, then report."""
    load.check_loopback(cfg.url)
    stats, stop, t0 = SoakStats(), asyncio.Event(), time.monotonic()
    async with load.make_client(cfg.bench()) as client:
        tasks = [client_loop(client, cfg, i, stats, stop) for i in range(cfg.clients)]
        tasks += [timer(cfg.duration_s, stop), progress(cfg, stats, stop, t0)]
        if cfg.pid is not None:
            tasks.append(rss_sampler(cfg, cfg.pid, stats, stop, t0))
        try:
            async with asyncio.timeout(cfg.duration_s + cfg.timeout + 30):
                await asyncio.gather(*tasks)
        except TimeoutError:
            load.log("hard time limit reached: in-flight requests abandoned")
        if cfg.pid is not None and not stats.server_gone:
            sample_rss(cfg.pid, stats, t0)
        health = await health_status(client, cfg.url)
    return summarize(cfg, stats, time.monotonic() - t0, health)


def mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} MB"


def rss_lines(cfg: SoakConfig, report: SoakReport) -> list[str]:
    """The RSS part of the report."""
    if cfg.pid is None:
        return ["RSS: not sampled (no --pid)"]
    growth = report.rss_growth_mb
    pct = ""
    if growth is not None and report.rss_warm_mb:
        pct = f" ({100 * growth / report.rss_warm_mb:+.1f}%)"
    lines = [
        f"RSS of pid {cfg.pid}: start {mb(report.rss_start_mb)}, "
        f"warm-up end (t={cfg.warmup_end_s:.0f} s) {mb(report.rss_warm_mb)}, "
        f"end {mb(report.rss_end_mb)}, max {mb(report.rss_max_mb)}",
        f"RSS growth after warm-up: {'–' if growth is None else f'{growth:+.1f} MB'}{pct}",
    ]
    if report.server_gone:
        lines.append("THE SERVER PROCESS DISAPPEARED DURING THE RUN")
    return lines


def render(cfg: SoakConfig, report: SoakReport) -> str:
    """The printed report."""
    header = ("kind", "sent", "ok", "latency p50 ms", "latency p99 ms")
    rows = [
        [k.kind, str(k.sent), str(k.ok), load.fmt(k.p50_ms), load.fmt(k.p99_ms)]
        for k in report.kinds
    ]
    errors = ", ".join(f"{kind} ×{n}" for kind, n in sorted(report.error_kinds.items())) or "none"
    return "\n".join(
        [
            f"soak: {report.elapsed_s / 60:.1f} min, {cfg.clients} clients, "
            f"{report.requests} requests, {report.errors} errors",
            f"errors by kind: {errors}",
            f"latency of completed requests (stream + non-stream): p50 "
            f"{load.fmt(report.latency_p50_ms)} ms, p99 {load.fmt(report.latency_p99_ms)} ms",
            load.markdown_table(header, rows),
            *rss_lines(cfg, report),
            f"GET /health at end: {report.health_at_end or 'no answer'}",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    parser.add_argument("--api-key")
    parser.add_argument("--model", help="model name to send (default: none)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pid", type=int, help="server PID whose VmRSS is sampled")
    parser.add_argument("--rss-interval", type=float, default=5.0, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="approximate, mean")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument(
        "--mix", type=float, nargs=3, default=[0.5, 0.3, 0.2], metavar=("STREAM", "PLAIN", "CANCEL")
    )
    parser.add_argument(
        "--warmup-seconds", type=float, help="default: first minute or 20%%, whichever is sooner"
    )
    parser.add_argument("--report-every", type=float, default=30.0, help="progress, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> SoakConfig:
    """A checked SoakConfig from the flags."""
    load.check_loopback(args.url)
    if (
        args.minutes <= 0
        or args.clients < 1
        or args.timeout <= 0
        or min(args.mix) < 0
        or sum(args.mix) <= 0
    ):
        raise ValueError("need positive minutes, clients and timeout, and a non-negative mix")
    if args.pid is not None and load.proc_status_kb(args.pid, "VmRSS") is None:
        raise ValueError(f"no process {args.pid} to sample RSS from")
    return SoakConfig(
        url=args.url,
        api_key=args.api_key,
        model=args.model,
        minutes=args.minutes,
        clients=args.clients,
        pid=args.pid,
        rss_interval=args.rss_interval,
        max_tokens=args.max_tokens,
        prompt_tokens=args.prompt_tokens,
        temperature=args.temperature,
        timeout=args.timeout,
        weights=(args.mix[0], args.mix[1], args.mix[2]),
        warmup_s=args.warmup_seconds,
        report_every=args.report_every,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = config_from(args)
    except ValueError as exc:
        raise SystemExit(f"soak.py: {exc}") from exc
    report = asyncio.run(run_soak(cfg))
    print(render(cfg, report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    if report.server_gone or report.health_at_end != 200:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
