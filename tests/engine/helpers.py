"""Helpers for driving an engine from synchronous tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.core.constraints import Grammar
from llmserve.core.params import SamplingParams
from llmserve.core.request import Delta, FinishReason, GenerationRequest, Usage
from llmserve.engines.base import EngineStats
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from llmserve.models.defaults import default_model_path

# One thread each: on a shared 2-core machine two busy-waiting ggml threads lose badly to
# any other load, one thread degrades gracefully. Speed is not what these tests measure.
ENGINE_TEST_CONFIG = {"ctx_size": 1024, "parallel": 8, "n_threads": 1, "n_threads_batch": 1}


def small_engine(**overrides: object) -> LlamaCppEngine:
    """Load the default model with the test settings, changed by `overrides`."""
    settings: dict[str, object] = {**ENGINE_TEST_CONFIG, **overrides}
    config = LlamaCppConfig(
        model_path=str(default_model_path()),
        model_id="smollm2-test",
        **settings,  # type: ignore[arg-type]
    )
    return LlamaCppEngine.load(config)


def chat(user: str) -> str:
    """A ChatML prompt (the bundled model's format) asking `user`."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def request(prompt: list[int], **params: object) -> GenerationRequest:
    """A request with a fresh id and the given sampling parameters (`grammar`: GBNF text)."""
    grammar = params.pop("grammar", None)
    if isinstance(grammar, str):
        params["constraint"] = Grammar(grammar)
    return GenerationRequest(
        request_id=f"test-{uuid.uuid4().hex[:8]}",
        prompt_tokens=prompt,
        params=SamplingParams(**params),  # type: ignore[arg-type]
    )


@dataclass
class Completion:
    """Every delta of one request, with accessors per choice."""

    deltas: list[Delta] = field(default_factory=list)

    def of(self, index: int) -> list[Delta]:
        """The deltas of choice `index`."""
        return [d for d in self.deltas if d.index == index]

    def text(self, index: int = 0) -> str:
        """The full text of choice `index`."""
        return "".join(d.text for d in self.of(index))

    def token_ids(self, index: int = 0) -> list[int]:
        """Every token id of choice `index`."""
        return [t for d in self.of(index) for t in d.token_ids]

    def final(self, index: int = 0) -> Delta:
        """The delta that ended choice `index`."""
        ends = [d for d in self.of(index) if d.finish_reason is not None]
        assert len(ends) == 1, f"choice {index} ended {len(ends)} times"
        return ends[0]

    @property
    def finish_reason(self) -> FinishReason | None:
        """How choice 0 ended."""
        return self.final(0).finish_reason

    @property
    def usage(self) -> Usage:
        """The usage on the request's last delta."""
        assert self.deltas and self.deltas[-1].usage is not None
        assert all(d.usage is None for d in self.deltas[:-1])
        return self.deltas[-1].usage


class Driver:
    """Runs requests on an engine from synchronous test code."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.engine = engine

    def prompt(self, user: str) -> list[int]:
        """Token ids of a chat prompt."""
        return self.engine.tokenize(chat(user), add_special=False)

    async def collect(self, req: GenerationRequest) -> Completion:
        """Consume a request to its end."""
        completion = Completion()
        async for delta in self.engine.generate(req):
            completion.deltas.append(delta)
        return completion

    def run(self, prompt: list[int], **params: object) -> Completion:
        """Run one request to its end."""
        return asyncio.run(self.collect(request(prompt, **params)))

    def stats(self) -> EngineStats:
        """The engine's current stats."""
        return self.engine.stats()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `condition` (letting the event loop run) until true or `timeout` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def idle(stats: EngineStats) -> bool:
    """No sequence runs or waits and every slot is free."""
    return stats.running == 0 and stats.waiting == 0 and stats.free_slots == stats.total_slots
