"""The llama.cpp engine's lifetime: no call touches freed llama.cpp memory; bad text is a 400."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from llmserve.core.errors import InvalidRequestError, ServiceUnavailableError
from llmserve.engines.llamacpp import engine as engine_module
from tests.engine.helpers import Driver, chat, request, small_engine

# Long enough that a tokenizer call is likely to be running when the engine frees the model.
TEXT = chat("Tell me about the weather in a long sentence, please. " * 2000)


def test_tokenize_racing_close_never_touches_freed_memory() -> None:
    """Tokenizer calls from many threads while the engine closes: results or a clean 503."""
    engine = small_engine(ctx_size=256, parallel=1)
    expected = engine.tokenize(TEXT, False)
    outcomes: list[str] = []

    def hammer() -> None:
        while True:
            try:
                ids = engine.tokenize(TEXT, False)
                outcomes.append("ok" if ids == expected else "wrong")
                outcomes.append("ok" if engine.detokenize(ids[:8]) else "wrong")
            except ServiceUnavailableError:
                outcomes.append("503")
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    while len(outcomes) < 20:
        threading.Event().wait(0.01)
    asyncio.run(engine.close())
    for thread in threads:
        thread.join(timeout=30)
    assert set(outcomes) <= {"ok", "503"}
    assert outcomes.count("503") == len(threads)  # every thread ended on a clean refusal
    with pytest.raises(ServiceUnavailableError):
        engine.tokenize("after close", False)
    with pytest.raises(ServiceUnavailableError):
        engine.detokenize([1, 2, 3])


def test_a_grammar_is_parsed_off_the_event_loop(
    llm: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = engine_module.check_grammar

    def recording(vocab: object, grammar: str, param: str) -> None:
        seen.append(threading.current_thread() is threading.main_thread())
        real(vocab, grammar, param)

    monkeypatch.setattr(engine_module, "check_grammar", recording)
    prompt = llm.prompt("Yes or no?")
    # A grammar of its own: the engine caches compiled ones, and others may have sent this one.
    grammar = f'root ::= "yes" | "no" # {uuid.uuid4().hex}'
    result = llm.run(prompt, temperature=0.0, max_tokens=4, grammar=grammar)
    assert result.text() in {"yes", "no"}
    with pytest.raises(InvalidRequestError) as caught:
        llm.run(prompt, grammar="root ::= (", max_tokens=4)
    assert caught.value.param == "grammar"
    assert seen == [False, False]  # a worker thread, never the event loop (the main thread)


@pytest.mark.parametrize("text", ["\ud800", "abc\udfffdef", "ok \ud83d then"])
def test_text_with_lone_surrogates_is_a_bad_request(llm: Driver, text: str) -> None:
    with pytest.raises(InvalidRequestError):
        llm.engine.tokenize(text, True)
    assert llm.engine.stats().alive
    assert llm.engine.tokenize("still fine", True)


def test_generation_after_close_is_refused() -> None:
    engine = small_engine(ctx_size=256, parallel=1)
    driver = Driver(engine)
    prompt = driver.prompt("Hello")
    asyncio.run(engine.close())
    with pytest.raises(ServiceUnavailableError):
        driver.run(prompt, max_tokens=2)
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(driver.collect(request(prompt, max_tokens=2, grammar='root ::= "a"')))
