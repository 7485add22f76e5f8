"""LlamaCppEngine: llama.cpp with continuous batching, run by one engine thread.

The engine thread owns the llama.cpp context and loops: take new requests, aborts and
commands, run one step (admit, one batch, one llama_decode, sample), publish a stats snapshot.
asyncio callers never block on it: requests go in through a lock-protected inbox, deltas come
back through each request's asyncio.Queue via `loop.call_soon_threadsafe`. Commands (LoRA
changes) run between steps and resolve their caller's future the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from llmserve.core.constraints import Constraint
from llmserve.core.errors import (
    EngineError,
    InvalidRequestError,
    LLMServeError,
    QueueFullError,
    ServiceUnavailableError,
)
from llmserve.core.request import Delta, GenerationRequest
from llmserve.engines.base import AdapterSpec, EngineStats, ModelInfo
from llmserve.engines.llamacpp.adapters import AdapterFile, check_adapters
from llmserve.engines.llamacpp.batch import TokenBatch
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.embedding import Embedder
from llmserve.engines.llamacpp.grammar import compile_constraint
from llmserve.engines.llamacpp.inspect import inspect_gguf, machine_memory
from llmserve.engines.llamacpp.model import ContextSettings, LlamaModel
from llmserve.engines.llamacpp.runner import StepRunner
from llmserve.engines.llamacpp.sampling import check_grammar
from llmserve.engines.llamacpp.scheduler import RequestGroup, Scheduler, prefix_copy_threshold
from llmserve.engines.validation import check_token_ids, validate_request

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_SIZE = 32  # compiled constraints kept per engine


@dataclass(eq=False)
class EngineCommand:
    """Work for the engine thread between steps; `settle` reports the outcome to the caller."""

    action: Callable[[], bool | None]  # True: not done yet, run it again after the next step
    settle: Callable[[Exception | None], None]  # callable from any thread


def _settle_future(future: asyncio.Future[None], error: Exception | None) -> None:
    if future.done():  # the caller stopped waiting (cancelled)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class ModelUse:
    """Counts calls into llama.cpp made outside the engine thread, so freeing waits for them.

    Tokenizing and grammar checks run on the event loop or in worker threads while the engine
    thread may be shutting down; it frees the model only after `close` has seen every such
    call end, and calls that come later raise ServiceUnavailableError instead of touching
    freed memory.
    """

    def __init__(self, model_id: str) -> None:
        self._model_id = model_id
        self._cond = threading.Condition()
        self._users = 0
        self._closed = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """Hold the model for the duration of the block."""
        with self._cond:
            if self._closed:
                raise ServiceUnavailableError(f"the engine for {self._model_id} has stopped")
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new calls and wait for the running ones to end."""
        with self._cond:
            self._closed = True
            while self._users:
                self._cond.wait()


class LlamaCppEngine:
    """The default engine: llama.cpp through its low-level API, with our own scheduler."""

    def __init__(
        self, config: LlamaCppConfig, info: ModelInfo, model: LlamaModel, runner: StepRunner
    ) -> None:
        """Use `LlamaCppEngine.load`; this wires already-built parts and starts nothing."""
        self.config = config
        self._embedder = Embedder(model, config, info.context_length)
        embeddings = replace(info.capabilities, embeddings=self._embedder.available)
        self.info = replace(info, capabilities=embeddings)
        self.parallel = len(runner.scheduler.slots)
        self._model = model
        self._use = ModelUse(config.model_id)
        self._adapter_target = model.adapter_target()
        # Clients repeat their schemas: compiling one can take longer than a short answer.
        self._grammars = functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile_checked)
        self._runner = runner
        self._cond = threading.Condition()
        self._inbox: list[RequestGroup] = []
        self._aborted_groups: list[RequestGroup] = []
        self._aborted_ids: set[str] = set()
        self._commands: list[EngineCommand] = []
        self._stopping = False
        self._alive = True
        self._error: str | None = None
        self._snapshot = runner.stats(alive=True, error=None)
        self._waiting_requests = 0
        self._thread = threading.Thread(
            target=self._run, name=f"llamacpp-{config.model_id}", daemon=True
        )

    @classmethod
    def load(cls, config: LlamaCppConfig) -> LlamaCppEngine:
        """Load the model, size the context and start the engine thread (blocking)."""
        model = LlamaModel.load(
            config.model_path, config.n_gpu_layers, config.use_mmap, config.cpu_repack
        )
        try:
            info, runner = _prepare_runner(config, model)
        except BaseException:
            model.free()
            raise
        engine = cls(config, info, model, runner)
        engine._thread.start()
        logger.info(
            "loaded %s (%s): %d slots x %d tokens",
            config.model_id,
            info.description,
            engine.parallel,
            info.context_length,
        )
        return engine

    # -- the Engine protocol ---------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Validate now (raising before any delta), then stream the request's deltas."""
        self._ensure_running()
        max_new_tokens = validate_request(req, self.info, self.parallel)
        with self._cond:
            self._ensure_queue_room()
        return self._stream(req, max_new_tokens)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids; special-token text (e.g. `<|im_end|>`) is parsed as such."""
        self._ensure_running()
        with self._use():
            try:
                return self._model.tokenize(text, add_special)
            except UnicodeEncodeError as exc:  # lone surrogates such as "\ud800"
                raise InvalidRequestError(
                    f"the text is not valid Unicode: {exc.reason} at position {exc.start}"
                ) from None

    def detokenize(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens rendered)."""
        self._ensure_running()
        check_token_ids(ids, self.info.vocab_size, "tokens")
        with self._use():
            return self._model.detokenize(ids)

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its stream ends with FinishReason.ABORT."""
        with self._cond:
            self._aborted_ids.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The latest snapshot from the engine thread, plus requests not yet picked up."""
        with self._cond:
            queued = sum(group.n for group in self._inbox)
            return replace(
                self._snapshot,
                waiting=self._snapshot.waiting + queued,
                alive=self._alive,
                error=self._error,
            )

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Apply exactly these LoRA adapters from the next step on (empty: none).

        Running sequences go on under the new weights; no prompt reuses KV computed before.
        Files are checked off the engine thread; reading a new adapter into llama.cpp pauses
        decoding for as long as that takes (adapters stay loaded for the next change).
        """
        self._ensure_running()
        files = await asyncio.to_thread(check_adapters, adapters, self._adapter_target)
        await self._call(partial(self._apply_adapters, files))

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """One vector per prompt, computed on the engine thread between generation steps.

        Each step embeds at most `prefill_chunk` tokens (embedding.py), so streams keep going.
        """
        self._ensure_running()
        self._embedder.check(prompts, self.info.vocab_size)
        job = self._embedder.job(prompts, normalize)
        try:
            await self._call(partial(self._embedder.advance, job))
        except asyncio.CancelledError:  # the caller left: the job stops at its next chunk
            job.cancelled = True
            raise
        return job.results()

    async def close(self) -> None:
        """Abort everything, stop the engine thread and free llama.cpp resources."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # -- admission checks (caller's thread) ------------------------------------------------

    def _ensure_running(self) -> None:
        if not self._alive or self._stopping:
            reason = f": {self._error}" if self._error else ""
            raise ServiceUnavailableError(f"the engine for {self.info.id} is not running{reason}")

    def _ensure_queue_room(self) -> None:
        """Raise QueueFullError when more than max_queue requests would wait (approximate)."""
        limit = self.config.max_queue
        if limit is None:
            return
        pending = len(self._inbox) + self._waiting_requests
        if pending - self._snapshot.free_slots >= limit:
            raise QueueFullError(f"{pending} requests are already waiting for {self.info.id}")

    # -- the asyncio bridge ----------------------------------------------------------------

    def _grammar(self, constraint: Constraint) -> str:
        """GBNF for `constraint`, parsed once by llama.cpp (a worker thread: this takes time)."""
        with self._use():
            return self._grammars(constraint)

    def _compile_checked(self, constraint: Constraint) -> str:
        grammar = compile_constraint(constraint)
        check_grammar(self._model.vocab, grammar, constraint.param)
        return grammar

    async def _stream(self, req: GenerationRequest, max_new_tokens: int) -> AsyncIterator[Delta]:
        grammar = None
        if req.params.constraint is not None:  # before any delta, so a bad one is still a 400
            grammar = await asyncio.to_thread(self._grammar, req.params.constraint)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()
        group: RequestGroup | None = None

        def deliver(item: Delta | Exception) -> None:  # runs on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read
                if group is not None:
                    self._abort_group(group)

        group = RequestGroup(
            request=req, deliver=deliver, max_new_tokens=max_new_tokens, grammar=grammar
        )
        self._submit(group)
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                done = item.usage is not None  # the request's very last delta
                yield item
        finally:
            if not done:  # the consumer left early (disconnect, cancel): free the slots
                self._abort_group(group)

    def _submit(self, group: RequestGroup) -> None:
        with self._cond:
            self._ensure_running()
            self._ensure_queue_room()
            self._inbox.append(group)
            self._cond.notify()

    def _abort_group(self, group: RequestGroup) -> None:
        with self._cond:
            self._aborted_groups.append(group)
            self._cond.notify()

    async def _call(self, action: Callable[[], bool | None]) -> None:
        """Run `action` on the engine thread between two steps (again while True) and wait."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(error: Exception | None) -> None:
            # A closed loop means the caller is gone and nobody waits for the outcome.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_future, future, error)

        with self._cond:
            self._ensure_running()
            self._commands.append(EngineCommand(action, settle))
            self._cond.notify()
        await future

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_work():
                started = time.perf_counter()
                self._runner.step()
                self._publish()
                self._runner.flush_outbox()
                self._runner.scheduler.counters.busy_seconds += time.perf_counter() - started
            self._shut_down()
        except BaseException as error:
            logger.exception("the llama.cpp engine thread died")
            self._die(error)

    def _take_work(self) -> bool:
        """Sleep until there is something to do; move requests and aborts in. False: stop."""
        with self._cond:
            while not (self._stopping or self._has_commands() or not self._runner.idle):
                self._cond.wait()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, []
            aborted, self._aborted_groups = self._aborted_groups, []
            aborted_ids, self._aborted_ids = self._aborted_ids, set()
            commands, self._commands = self._commands, []
        for command in commands:  # first, so requests queued meanwhile see their effect
            self._run_command(command)
        for group in inbox:
            self._runner.submit(group)
        for group in aborted:
            self._runner.abort(group)
        if aborted_ids:
            for group in self._runner.groups():
                if group.request.request_id in aborted_ids:
                    self._runner.abort(group)
        self._publish()
        self._runner.flush_outbox()
        return True

    def _has_commands(self) -> bool:
        return bool(self._inbox or self._aborted_groups or self._aborted_ids or self._commands)

    def _run_command(self, command: EngineCommand) -> None:
        try:
            unfinished = command.action()
        except LLMServeError as error:
            command.settle(error)
        except Exception as error:  # a failed command must not take the engine down
            logger.exception("an engine command failed")
            command.settle(EngineError(f"{type(error).__name__}: {error}"))
        except BaseException:
            command.settle(ServiceUnavailableError("the engine is stopping"))
            raise
        else:
            if not unfinished:
                command.settle(None)
                return
            with self._cond:  # its next part runs after the next step: streams go on meanwhile
                self._commands.append(command)

    def _apply_adapters(self, files: list[AdapterFile]) -> None:
        """Engine thread: load and apply the adapters; stale prefix caches go."""
        if self._model.loras.apply(self._model.ctx, files):
            self._runner.scheduler.invalidate_prefix_cache()

    def _fail_commands(self, error: Exception) -> None:
        with self._cond:
            commands, self._commands = self._commands, []
        for command in commands:
            command.settle(error)

    def _publish(self) -> None:
        snapshot = self._runner.stats(alive=True, error=None)
        waiting_requests = len(self._runner.scheduler.waiting)
        with self._cond:
            self._snapshot = snapshot
            self._waiting_requests = waiting_requests

    def _shut_down(self) -> None:
        """Normal stop: every request ends with ABORT, then llama.cpp is freed."""
        self._fail_commands(ServiceUnavailableError("the engine stopped"))
        with self._cond:
            inbox, self._inbox = self._inbox, []
            self._alive = False
        for group in inbox:
            self._runner.submit(group)
        for group in self._runner.groups():
            self._runner.abort(group)
        self._publish()
        self._runner.flush_outbox()
        self._use.close()
        self._embedder.free()
        self._runner.free()

    def _die(self, error: BaseException) -> None:
        """The step loop crashed: fail every request with 503 and refuse new ones."""
        with self._cond:
            self._alive = False
            self._error = f"{type(error).__name__}: {error}"
            inbox, self._inbox = self._inbox, []
        self._fail_commands(ServiceUnavailableError(f"the engine stopped: {self._error}"))
        self._runner.flush_outbox()  # what was already produced is still valid
        pending = inbox + self._runner.groups()
        for group in pending:
            group.deliver(ServiceUnavailableError(f"the engine stopped: {self._error}"))
        try:
            self._use.close()
            self._embedder.free()
            self._runner.free()
        except Exception:  # the state that killed the loop may also break freeing
            logger.exception("freeing llama.cpp resources after the crash failed")


def _prepare_runner(config: LlamaCppConfig, model: LlamaModel) -> tuple[ModelInfo, StepRunner]:
    """Size the context for the configured slots and wire the scheduler to it."""
    ctx_size = config.resolve_ctx_size(model.n_ctx_train)
    kv_bytes_per_token = inspect_gguf(Path(config.model_path)).kv_bytes_per_token
    parallel = config.resolve_parallel(ctx_size, kv_bytes_per_token, machine_memory())
    if ctx_size > model.n_ctx_train:
        logger.warning(
            "ctx_size %d exceeds the model's training context %d", ctx_size, model.n_ctx_train
        )
    batch_capacity = config.prefill_chunk + parallel  # prefill budget + one token per sequence
    cpus = os.cpu_count() or 1
    model.create_context(
        ContextSettings(
            config=config,
            n_ctx=parallel * ctx_size,
            n_seq_max=parallel,
            n_batch=batch_capacity,
            n_threads=config.n_threads or cpus,
            n_threads_batch=config.n_threads_batch or cpus,
        )
    )
    info = model.describe(config.model_id, ctx_size)
    scheduler = Scheduler(
        n_slots=parallel,
        ctx_size=ctx_size,
        prefill_budget=config.prefill_chunk,
        memory=model,
        min_copy_gain=prefix_copy_threshold(config.kv_unified, ctx_size),
    )
    batch = TokenBatch(batch_capacity)
    return info, StepRunner(model, scheduler, batch, info.eog_token_ids)
