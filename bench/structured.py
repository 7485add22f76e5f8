"""Does a structured-output stream slow the others down? (issue 7, point 4)

Runs N plain streaming chat requests alone (baseline), then the same N beside one stream
constrained by `response_format: json_schema` that restarts until they finish, and compares
the median inter-token latency (ITL) of the plain streams:

    python bench/structured.py --url http://127.0.0.1:8000/v1 [--api-key KEY] \
        [--plain 7] [--max-tokens 64] [--rounds 3] [--control] [--json out.json]

Rounds alternate baseline / with-JSON so slow drift in machine load hits both alike; the
ratio is the pooled median ITL with the JSON stream over the pooled median without it. The
JSON outputs are checked: each must parse and validate against the schema. `--control` adds
phases beside the same request without `response_format`: what any 8th stream costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema

import load

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "role": {"enum": ["engineer", "artist", "doctor", "teacher"]},
    },
    "required": ["name", "age", "city", "hobbies", "role"],
    "additionalProperties": False,
}


@dataclass
class RoundResult:
    """One phase of one round: the plain streams' ITLs and what the JSON stream produced."""

    extra: str  # beside the plain streams: "none", "json" or "control" (unconstrained)
    plain_itls_ms: list[float] = field(default_factory=list)
    plain_errors: list[str] = field(default_factory=list)
    json_outputs: int = 0
    json_valid: int = 0
    json_chunks: int = 0
    json_errors: list[str] = field(default_factory=list)


def plain_body(args: argparse.Namespace, index: int, round_no: int) -> dict[str, Any]:
    """A plain streaming chat request generating exactly --max-tokens tokens."""
    prompt = load.make_prompt(args.seed, f"plain-{round_no}-{index}", args.prompt_tokens)
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def json_body(seed: int, constrained: bool = True) -> dict[str, Any]:
    """A streaming chat request constrained by SCHEMA (or, as a control, the same without it)."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Describe a made-up person as JSON."}],
        "max_tokens": 200,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        },
    }
    if not constrained:
        del body["response_format"]
        body["max_tokens"] = 48  # about as long as a constrained answer
    return body


async def json_stream(
    client: httpx.AsyncClient, seed: int, constrained: bool = True
) -> tuple[str, int]:
    """One (constrained) request: its content and the number of content chunks."""
    parts: list[str] = []
    body = json_body(seed, constrained)
    async with client.stream("POST", "chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            parts.append(load.chunk_text(chunk))
    return "".join(parts), len(parts)


async def json_loop(
    client: httpx.AsyncClient, result: RoundResult, stop: asyncio.Event, constrained: bool
) -> None:
    """Constrained requests back to back until `stop`; each output is validated."""
    seed = 0
    while not stop.is_set():
        task = asyncio.ensure_future(json_stream(client, seed, constrained))
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task not in done:
            task.cancel()  # the plain streams are done; an unfinished output is not judged
            break
        seed += 1
        try:
            text, chunks = task.result()
        except (httpx.HTTPError, ValueError) as exc:
            result.json_errors.append(type(exc).__name__)
            continue
        result.json_outputs += 1
        result.json_chunks += chunks
        if not constrained:
            continue
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            result.json_valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            result.json_errors.append(f"{type(exc).__name__}: {text[:80]!r}")


async def run_phase(
    client: httpx.AsyncClient, args: argparse.Namespace, round_no: int, extra: str
) -> RoundResult:
    """N plain streams at once, beside the JSON loop (or its control), or alone."""
    result = RoundResult(extra)
    stop = asyncio.Event()
    background = (
        asyncio.ensure_future(json_loop(client, result, stop, extra == "json"))
        if extra != "none"
        else None
    )
    if background is not None:
        await asyncio.sleep(args.lead_in)  # let the JSON stream be decoding when they start
    plain = await asyncio.gather(
        *(
            load.stream_request(
                client, "chat/completions", plain_body(args, i, round_no), args.timeout
            )
            for i in range(args.plain)
        )
    )
    stop.set()
    if background is not None:
        await background
    for item in plain:
        if item.ok:
            result.plain_itls_ms += [s * 1000 for s in item.itls]
        else:
            result.plain_errors.append(str(item.error))
    return result


def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return load.percentile(values, 50)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then alternate baseline and with-JSON phases."""
    load.check_loopback(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rounds: list[RoundResult] = []
    start_load = loadavg()
    async with httpx.AsyncClient(
        base_url=args.url.rstrip("/") + "/",
        headers=headers,
        timeout=httpx.Timeout(args.timeout),
        limits=httpx.Limits(max_connections=args.plain + 4),
        trust_env=False,
    ) as client:
        await json_stream(client, 12345)  # warm-up, also checks the server accepts the schema
        extras = ["none", "json", *(["control"] if args.control else [])]
        for round_no in range(args.rounds):
            shift = round_no % len(extras)  # rotate the order so drift hits every phase alike
            for extra in extras[shift:] + extras[:shift]:
                load.log(f"round {round_no + 1}/{args.rounds}: beside the plain streams: {extra}")
                rounds.append(await run_phase(client, args, round_no, extra))
    medians = {
        extra: median([v for r in rounds if r.extra == extra for v in r.plain_itls_ms])
        for extra in extras
    }
    base = medians["none"]
    return {
        "plain_streams": args.plain,
        "rounds": args.rounds,
        "itl_p50_ms": medians,
        "ratio": _ratio(medians["json"], base),
        "control_ratio": _ratio(medians.get("control"), base),
        "json_outputs": sum(r.json_outputs for r in rounds if r.extra == "json"),
        "json_valid": sum(r.json_valid for r in rounds),
        "json_errors": [e for r in rounds for e in r.json_errors],
        "plain_errors": [e for r in rounds for e in r.plain_errors],
        "load_average_start": start_load,
        "load_average_end": loadavg(),
        "phases": [
            asdict(r) | {"plain_itls_ms": len(r.plain_itls_ms), "p50_ms": median(r.plain_itls_ms)}
            for r in rounds
        ],
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


def report(summary: dict[str, Any]) -> str:
    """A few lines for a human."""
    medians = summary["itl_p50_ms"]
    lines = [
        f"median ITL of {summary['plain_streams']} plain streams: "
        f"{load.fmt(medians['none'], 2)} ms alone, "
        f"{load.fmt(medians['json'], 2)} ms beside 1 json_schema stream",
        f"ratio: {load.fmt(summary['ratio'], 3)} (target <= 1.15)",
    ]
    if summary["control_ratio"] is not None:
        lines.append(
            f"control: {load.fmt(medians['control'], 2)} ms beside 1 unconstrained stream, "
            f"ratio {load.fmt(summary['control_ratio'], 3)}"
        )
    return "\n".join(
        [
            *lines,
            f"JSON outputs valid: {summary['json_valid']}/{summary['json_outputs']}",
            f"errors: plain {len(summary['plain_errors'])}, json {len(summary['json_errors'])}",
            f"load average: {summary['load_average_start']:.2f} at start, "
            f"{summary['load_average_end']:.2f} at end",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key")
    parser.add_argument("--plain", type=int, default=7, help="plain streams per phase")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per plain stream")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="baseline + with-JSON pairs")
    parser.add_argument("--lead-in", type=float, default=0.5, help="seconds the JSON stream leads")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run phases beside the same stream without response_format (any 8th stream)",
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run and print the comparison."""
    args = parse_args(argv)
    if loadavg() > 1.5:
        load.log(f"warning: load average {loadavg():.2f}; figures will be noisy")
    started = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["wall_seconds"] = time.perf_counter() - started
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
