"""The llama.cpp engine on the real default model: sampling, batching, stops, caching, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from llmserve.core.errors import ContextLengthExceededError, InvalidRequestError
from llmserve.core.params import DrySettings, MirostatMode
from llmserve.core.request import FinishReason
from llmserve.engines.llamacpp.config import MAX_DEFAULT_PARALLEL, LlamaCppConfig
from llmserve.engines.llamacpp.engine import LlamaCppEngine
from llmserve.engines.llamacpp.inspect import machine_memory
from llmserve.engines.llamacpp.scheduler import common_prefix_length
from tests.engine.helpers import Completion, Driver, idle, request, small_engine, wait_for

STORY = "Write a long story about a cat who learns to sail."
# A system prompt long enough that reusing it is worth something.
SHARED_PREFIX = (
    "<|im_start|>system\nYou are a careful assistant for a sailing club. Members ask about "
    "boats, knots, tides, weather and safety. Answer briefly, in plain words, and say when "
    "you are unsure. Never invent club rules. The club owns four dinghies and one keelboat; "
    "lessons run on Saturdays from April to October; life jackets are mandatory on the water."
    "<|im_end|>\n"
)


def shared_prefix_prompt(llm: Driver, nonce: str, question: str) -> list[int]:
    """SHARED_PREFIX (made unique by `nonce`, so no other test cached it) plus a question."""
    text = f"{nonce} {SHARED_PREFIX}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return llm.engine.tokenize(text, add_special=False)


# -- sampling ------------------------------------------------------------------------------


def test_greedy_is_deterministic(llm: Driver) -> None:
    prompt = llm.prompt(STORY)
    first = llm.run(prompt, temperature=0.0, max_tokens=24)
    second = llm.run(prompt, temperature=0.0, max_tokens=24)
    assert first.token_ids() and first.text()
    assert first.token_ids() == second.token_ids()
    assert first.text() == second.text()


def test_seed_makes_sampling_reproducible(llm: Driver) -> None:
    prompt = llm.prompt("Tell me about the sea.")
    same_a = llm.run(prompt, temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True)
    same_b = llm.run(prompt, temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True)
    other = llm.run(prompt, temperature=0.8, seed=4321, max_tokens=24, ignore_eos=True)
    assert same_a.token_ids() == same_b.token_ids()
    assert same_a.token_ids() != other.token_ids()


def test_grammar_constrains_output(llm: Driver) -> None:
    prompt = llm.prompt("Is the sky green? Answer yes or no.")
    result = llm.run(prompt, temperature=0.0, max_tokens=8, grammar='root ::= "yes" | "no"')
    assert result.text() in {"yes", "no"}
    assert result.finish_reason is FinishReason.STOP


def test_invalid_grammar_is_rejected(llm: Driver) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        llm.run(llm.prompt("Hi"), grammar="root ::= (", max_tokens=4)
    assert caught.value.param == "grammar"


# -- batching ------------------------------------------------------------------------------


def test_concurrent_requests_share_steps(llm: Driver) -> None:
    """8 requests decode together: every one has its first token before any finishes."""
    events: list[tuple[str, int]] = []

    async def one(i: int) -> Completion:
        completion = Completion()
        req = request(llm.prompt(f"Story number {i} about a dog."), max_tokens=16, ignore_eos=True)
        async for delta in llm.engine.generate(req):
            if not completion.deltas:
                events.append(("first", i))
            completion.deltas.append(delta)
        events.append(("done", i))
        return completion

    async def all_of_them() -> list[Completion]:
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(all_of_them())
    assert all(len(r.token_ids()) == 16 for r in results)
    first_done = next(n for n, (kind, _) in enumerate(events) if kind == "done")
    assert sorted(i for kind, i in events[:first_done] if kind == "first") == list(range(8))


# -- stopping ------------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_held_back(llm: Driver) -> None:
    prompt = llm.prompt(STORY)
    free = llm.run(prompt, temperature=0.0, max_tokens=32, ignore_eos=True)
    tokens, text = free.token_ids(), free.text()
    pieces = [llm.engine.detokenize([t]) for t in tokens]
    assert "".join(pieces) == text
    # The stop string: the last 2 characters of one token plus the whole next token, so it
    # starts inside a token and spans two of them. Pick the first whose earliest occurrence is
    # where we took it from.
    for j in range(3, len(tokens) - 1):
        stop = pieces[j][-2:] + pieces[j + 1]
        start = len("".join(pieces[: j + 1])) - 2
        if len(pieces[j]) >= 2 and pieces[j + 1] and text.find(stop) == start:
            break
    else:
        pytest.fail(f"no usable stop string in {text!r}")
    stopped = llm.run(prompt, temperature=0.0, max_tokens=32, ignore_eos=True, stop=(stop,))
    assert stopped.text() == text[:start]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.final().stop_reason == stop
    assert stopped.token_ids() == tokens[: j + 2]  # it stopped at the token completing it


def test_stop_token_id_ends_without_its_text(llm: Driver) -> None:
    prompt = llm.prompt(STORY)
    free = llm.run(prompt, temperature=0.0, max_tokens=16, ignore_eos=True)
    tokens = free.token_ids()
    at = next(i for i in range(4, len(tokens)) if tokens.index(tokens[i]) == i)
    stopped = llm.run(prompt, temperature=0.0, max_tokens=16, stop_token_ids=(tokens[at],))
    assert stopped.token_ids() == tokens[: at + 1]
    assert stopped.text() == llm.engine.detokenize(tokens[:at])
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.final().stop_reason == tokens[at]


def test_max_tokens_ends_with_length(llm: Driver) -> None:
    result = llm.run(llm.prompt(STORY), temperature=0.0, max_tokens=7)
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.completion_tokens == 7
    assert len(result.token_ids()) == 7


def test_min_tokens_holds_off_the_end(llm: Driver) -> None:
    prompt = llm.prompt("Reply with one word: yes or no. Is water wet?")
    natural = llm.run(prompt, temperature=0.0, max_tokens=40)
    assert natural.finish_reason is FinishReason.STOP  # the model ends on its own
    # How soon depends on the host's kernels (7 tokens on one, 8 on another): hold it past that.
    floor = len(natural.token_ids()) + 4
    held = llm.run(prompt, temperature=0.0, max_tokens=40, min_tokens=floor)
    assert len(held.token_ids()) >= floor
    exact = llm.run(prompt, temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True)
    assert len(exact.token_ids()) == 12
    assert exact.usage.completion_tokens == 12
    assert exact.finish_reason is FinishReason.LENGTH


# -- n > 1 ---------------------------------------------------------------------------------


def test_n_choices_prefill_once_and_differ(llm: Driver) -> None:
    prompt = llm.prompt("Name a colour and describe it. (n-choices test)")
    before = llm.stats()
    result = llm.run(prompt, n=3, seed=99, temperature=1.0, max_tokens=12, ignore_eos=True)
    after = llm.stats()
    assert {d.index for d in result.deltas} == {0, 1, 2}
    choices = [result.token_ids(i) for i in range(3)]
    assert all(len(c) == 12 for c in choices)
    assert len({tuple(c) for c in choices}) > 1  # seed + index: the choices differ
    assert result.usage.prompt_tokens == len(prompt)
    assert result.usage.completion_tokens == 36
    # The prompt went into the KV cache once (prefilled or reused), not once per choice.
    assert after.prompt_tokens_total - before.prompt_tokens_total == len(prompt)
    again = llm.run(prompt, n=3, seed=99, temperature=1.0, max_tokens=12, ignore_eos=True)
    assert [again.token_ids(i) for i in range(3)] == choices


def test_n_larger_than_parallel_is_rejected(llm: Driver) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        llm.run(llm.prompt("Hi"), n=llm.engine.parallel + 1, max_tokens=2)
    assert caught.value.param == "n"


# -- prefix cache --------------------------------------------------------------------------


def test_prefix_of_finished_request_is_reused(llm: Driver) -> None:
    first_prompt = shared_prefix_prompt(llm, "alpha-7", "How do I tie a bowline?")
    second_prompt = shared_prefix_prompt(llm, "alpha-7", "When are lessons?")
    first = llm.run(first_prompt, temperature=0.0, max_tokens=2)
    before = llm.stats()
    second = llm.run(second_prompt, temperature=0.0, max_tokens=2)
    after = llm.stats()
    shared = common_prefix_length(first_prompt, second_prompt, len(second_prompt) - 1)
    assert shared > 50
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == shared
    assert after.cached_prompt_tokens_total - before.cached_prompt_tokens_total == shared


def check_running_prefix_is_shared(llm: Driver, nonce: str) -> None:
    """A busy slot's prompt KV is copied into the new request's slot, and both stay right."""
    running_prompt = shared_prefix_prompt(llm, nonce, "Tell me about tides.")
    new_prompt = shared_prefix_prompt(llm, nonce, "Which boats does the club own?")
    shared = common_prefix_length(running_prompt, new_prompt, len(new_prompt) - 1)

    async def scenario() -> tuple[list[int], Completion, Completion, Completion]:
        started = asyncio.Event()
        running_tokens: list[int] = []

        async def keep_running() -> None:
            req = request(running_prompt, temperature=0.0, max_tokens=400, ignore_eos=True)
            async for delta in llm.engine.generate(req):
                running_tokens.extend(delta.token_ids)
                started.set()

        runner = asyncio.create_task(keep_running())
        await started.wait()
        reusing = await llm.collect(request(new_prompt, temperature=0.0, max_tokens=6))
        await asyncio.sleep(0.2)  # the source keeps decoding after its KV was copied
        runner.cancel()  # a cancelled consumer aborts its request
        await asyncio.gather(runner, return_exceptions=True)
        # Prompt logprobs force a full prefill: the reference for what the copy must equal.
        fresh = await llm.collect(
            request(new_prompt, temperature=0.0, max_tokens=6, prompt_logprobs=0)
        )
        source_alone = await llm.collect(
            request(running_prompt, temperature=0.0, max_tokens=8, prompt_logprobs=0)
        )
        assert await wait_for(lambda: idle(llm.stats()))
        return running_tokens, reusing, fresh, source_alone

    running_tokens, reusing, fresh, source_alone = asyncio.run(scenario())
    assert reusing.usage.cached_tokens == shared > 50
    assert fresh.usage.cached_tokens == 0
    assert reusing.token_ids()[:4] == fresh.token_ids()[:4]
    assert len(running_tokens) >= 8
    assert running_tokens[:4] == source_alone.token_ids()[:4]


def test_prefix_of_running_request_is_shared(llm: Driver) -> None:
    """One KV stream per slot (the default): the whole stream is copied, then trimmed."""
    assert not llm.engine.config.kv_unified
    check_running_prefix_is_shared(llm, "bravo-3")


# -- cancellation --------------------------------------------------------------------------


def test_leaving_the_stream_early_frees_the_slot(llm: Driver) -> None:
    async def scenario() -> bool:
        seen = 0
        req = request(llm.prompt(STORY), max_tokens=500, ignore_eos=True)
        async for _ in llm.engine.generate(req):
            seen += 1
            if seen == 3:
                break
        return await wait_for(lambda: idle(llm.stats()), timeout=3.0)

    assert asyncio.run(scenario())
    stats = llm.stats()
    assert stats.running == 0
    assert stats.free_slots == stats.total_slots


def test_abort_by_request_id_ends_the_stream(llm: Driver) -> None:
    async def scenario() -> Completion:
        req = request(llm.prompt(STORY), max_tokens=500, ignore_eos=True)
        completion = Completion()
        async for delta in llm.engine.generate(req):
            completion.deltas.append(delta)
            if len(completion.deltas) == 2:
                llm.engine.abort(req.request_id)
        return completion

    result = asyncio.run(scenario())
    assert result.finish_reason is FinishReason.ABORT
    assert result.usage.completion_tokens == len(result.token_ids()) < 500


# -- logprobs ------------------------------------------------------------------------------


def test_logprobs_have_one_entry_per_token_with_top_alternatives(llm: Driver) -> None:
    result = llm.run(llm.prompt(STORY), temperature=0.0, max_tokens=6, logprobs=3)
    for delta in result.deltas:
        assert len(delta.logprobs) == len(delta.token_ids) == 1
        entry = delta.logprobs[0]
        assert entry.token_id == delta.token_ids[0]
        assert len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted(
            (t.logprob for t in entry.top), reverse=True
        )
        # Greedy picks the most likely token: it is the top entry, with the same logprob.
        assert entry.top[0].token_id == entry.token_id
        assert entry.logprob == entry.top[0].logprob
        assert entry.logprob <= 0.0
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_prompt_logprobs_score_every_prompt_token(llm: Driver) -> None:
    prompt = llm.prompt("Score this prompt, please.")
    scored = llm.run(prompt, temperature=0.0, max_tokens=1, logprobs=1, prompt_logprobs=2)
    entries = scored.deltas[0].prompt_logprobs
    assert entries is not None
    assert len(entries) == len(prompt)
    assert entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        assert entry is not None
        assert entry.token_id == prompt[position]
        assert len(entry.top) == 2
        assert entry.logprob <= entry.top[0].logprob
    assert all(d.prompt_logprobs is None for d in scored.deltas[1:])
    # lm-eval's loglikelihood: echoing prompt + greedy token scores that token exactly as
    # the generation did.
    greedy = scored.deltas[0].logprobs[0]
    echoed = llm.run([*prompt, greedy.token_id], max_tokens=0, prompt_logprobs=1)
    assert echoed.finish_reason is FinishReason.LENGTH
    assert echoed.usage.completion_tokens == 0
    last = echoed.deltas[0].prompt_logprobs
    assert last is not None and last[-1] is not None
    assert last[-1].token_id == greedy.token_id
    assert last[-1].logprob == pytest.approx(greedy.logprob, abs=1e-4)
    assert last[-1].top[0].token_id == greedy.token_id


# -- validation ----------------------------------------------------------------------------


def test_prompt_too_long_fails_before_generating(llm: Driver) -> None:
    ctx = llm.engine.info.context_length
    prompt = (llm.prompt("hello " * ctx) * 2)[: ctx - 24]

    async def attempt() -> int:
        seen = 0
        async for _ in llm.engine.generate(request(prompt, max_tokens=100)):
            seen += 1
        return seen

    with pytest.raises(ContextLengthExceededError) as caught:
        asyncio.run(attempt())
    message = caught.value.message
    assert str(ctx) in message and str(ctx - 24 + 100) in message
    with pytest.raises(ContextLengthExceededError):
        llm.run(prompt + [1] * 24)  # no max_tokens: no room left at all


def test_invalid_prompts_are_rejected(llm: Driver) -> None:
    vocab_size = llm.engine.info.vocab_size
    for prompt in ([], [1, vocab_size], [-3]):
        with pytest.raises(InvalidRequestError) as caught:
            llm.run(prompt, max_tokens=2)
        assert caught.value.param == "prompt"


# -- model facts ---------------------------------------------------------------------------


def test_info_describes_the_model(llm: Driver) -> None:
    info = llm.engine.info
    assert info.vocab_size == 49152
    assert info.context_length == 1024
    assert info.train_context_length == 8192
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.eos_token == "<|im_end|>"
    assert 2 in info.eog_token_ids
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    assert info.n_params > 100_000_000


def test_tokenize_parses_special_tokens_and_round_trips(llm: Driver) -> None:
    text = "<|im_start|>user\nCafé ☕<|im_end|>"
    ids = llm.engine.tokenize(text, add_special=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert llm.engine.detokenize(ids) == text


# -- samplers and text ---------------------------------------------------------------------

SAMPLER_SETTINGS = {
    "mirostat-v1": {"mirostat": MirostatMode.V1, "mirostat_tau": 4.0},
    "mirostat-v2": {"mirostat": MirostatMode.V2},
    "penalties-dry": {
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "dry": DrySettings(multiplier=0.8),
    },
    "truncation": {
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "typical_p": 0.9,
        "top_n_sigma": 1.5,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.1,
    },
}


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS.values(), ids=SAMPLER_SETTINGS.keys())
def test_every_sampler_chain_samples_reproducibly(llm: Driver, settings: dict[str, object]) -> None:
    prompt = llm.prompt("Describe a harbour at dawn.")
    first = llm.run(prompt, seed=5, max_tokens=6, ignore_eos=True, **settings)
    second = llm.run(prompt, seed=5, max_tokens=6, ignore_eos=True, **settings)
    assert len(first.token_ids()) == 6
    assert first.token_ids() == second.token_ids()


def test_logit_bias_and_banned_tokens_steer_greedy_choice(llm: Driver) -> None:
    prompt = llm.prompt(STORY)
    natural = llm.run(prompt, temperature=0.0, max_tokens=3).token_ids()
    banned = llm.run(prompt, temperature=0.0, max_tokens=3, banned_token_ids=(natural[0],))
    assert banned.token_ids()[0] != natural[0]
    colon = llm.engine.tokenize(":", add_special=False)[0]
    forced = llm.run(prompt, temperature=0.0, max_tokens=3, logit_bias={colon: 100.0})
    assert forced.token_ids() == [colon] * 3


def test_characters_split_across_tokens_are_emitted_whole(llm: Driver) -> None:
    """🐈 and ☕ are three byte-level tokens each; no delta may carry half a character."""
    assert len(llm.engine.tokenize("☕", add_special=False)) > 1
    result = llm.run(
        llm.prompt("Draw a cat."), temperature=0.0, max_tokens=12, grammar='root ::= "🐈☕🐈"'
    )
    assert result.text() == "🐈☕🐈"
    assert all("\ufffd" not in d.text for d in result.deltas)
    assert [d.text for d in result.deltas if d.text] == ["🐈", "☕", "🐈"]


# -- loading -------------------------------------------------------------------------------


def test_missing_model_file_is_reported_before_llama_cpp_sees_it(tmp_path: Path) -> None:
    config = LlamaCppConfig(model_path=str(tmp_path / "absent.gguf"), model_id="absent")
    with pytest.raises(FileNotFoundError):
        LlamaCppEngine.load(config)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        LlamaCppConfig(model_path="m.gguf", model_id="m", cache_type_k="q3_weird")
    with pytest.raises(ValueError):
        LlamaCppConfig(model_path="m.gguf", model_id="m", parallel=0)


def test_config_sizes_context_and_slots_from_the_model() -> None:
    config = LlamaCppConfig(model_path="m.gguf", model_id="m")
    assert config.resolve_ctx_size(8192) == 4096
    assert config.resolve_ctx_size(2048) == 2048
    smollm_cell = 2 * 30 * 192 * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K and V
    gib = 1 << 30
    # 1/8 of a 24 GiB machine (3 GiB) holds 34 slots of 4096 cells: capped at 32.
    assert config.resolve_parallel(4096, smollm_cell, 24 * gib) == MAX_DEFAULT_PARALLEL == 32
    # An 8 GiB laptop: 1 GiB of KV, 11 slots of 4096 cells.
    assert config.resolve_parallel(4096, smollm_cell, 8 * gib) == 11
    # The 4 GiB cap holds on a large machine; a model whose slot needs more still gets one.
    assert config.resolve_parallel(4096, 128 * 1024, 512 * gib) == 8
    assert config.resolve_parallel(65536, 512 * 1024, 24 * gib) == 1
    assert config.resolve_parallel(4096, smollm_cell, None) == 32  # memory unknown: the cap
    pinned = LlamaCppConfig(model_path="m.gguf", model_id="m", parallel=3)
    assert pinned.resolve_parallel(4096, smollm_cell, 24 * gib) == 3
    memory = machine_memory()  # this Linux machine's MemTotal (or its cgroup's limit)
    assert memory is not None and memory >= 1 << 28


def test_unified_kv_cache_shares_prefixes_and_forks_choices() -> None:
    """kv_unified=True: prefixes are shared as cell metadata; n > 1 forks work the same."""
    engine = small_engine(ctx_size=1024, parallel=3, kv_unified=True)
    try:
        driver = Driver(engine)
        check_running_prefix_is_shared(driver, "charlie-5")
        prompt = driver.prompt("Tell me a joke about sailors.")
        result = driver.run(prompt, n=3, seed=3, temperature=1.0, max_tokens=6, ignore_eos=True)
        assert [len(result.token_ids(i)) for i in range(3)] == [6, 6, 6]
        again = driver.run([*prompt, 13], temperature=0.0, max_tokens=2)
        assert again.usage.cached_tokens == len(prompt)
    finally:
        asyncio.run(engine.close())
