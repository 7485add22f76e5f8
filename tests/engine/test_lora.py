"""LoRA adapters in the llama.cpp engine, with small adapters the tests write themselves."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from llmserve.core.errors import InvalidRequestError, ServiceUnavailableError
from llmserve.core.request import FinishReason
from llmserve.engines.base import AdapterSpec
from llmserve.models.defaults import default_model_path
from tests.engine.helpers import Driver, request, small_engine
from tests.engine.test_scheduler import finish_all, make_group, make_scheduler, run_prefill
from tests.lora_file import N_EMBD, smol_lora_tensors, write_lora

QUESTION = "Write a short poem about the sea."
GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one good adapter, `lora.gguf`."""
    folder = tmp_path_factory.mktemp("loras")
    write_lora(folder / "lora.gguf")
    return folder


@pytest.fixture
def adapters(llm: Driver) -> Iterator[Callable[..., None]]:
    """Set adapters on the shared engine; every test leaves it without any."""

    def apply(*specs: AdapterSpec) -> None:
        asyncio.run(llm.engine.set_adapters(specs))

    yield apply
    apply()


def greedy(llm: Driver, nonce: str) -> tuple[str, int]:
    """Greedy text of a prompt only this test uses, and how many prompt tokens were cached."""
    completion = llm.run(llm.prompt(f"{nonce} {QUESTION}"), **GREEDY)
    return completion.text(), completion.usage.cached_tokens


def test_adapter_changes_greedy_output_and_removing_it_restores_it(
    llm: Driver, lora_dir: Path, adapters: Callable[..., None]
) -> None:
    base, _ = greedy(llm, "a1")
    adapters(AdapterSpec(str(lora_dir / "lora.gguf"), 1.0))
    adapted, cached = greedy(llm, "a1")
    assert adapted != base
    assert cached == 0  # the prompt's KV from before the adapter is not reused
    again, cached = greedy(llm, "a1")
    assert again == adapted and cached > 0  # under unchanged weights the cache serves again
    adapters()
    restored, cached = greedy(llm, "a1")
    assert restored == base and cached == 0


def test_scale_zero_is_no_adapter(
    llm: Driver, lora_dir: Path, adapters: Callable[..., None]
) -> None:
    base, _ = greedy(llm, "a2")
    adapters(AdapterSpec(str(lora_dir / "lora.gguf"), 0.0))
    assert greedy(llm, "a2")[0] == base


def odd_tensors() -> dict[str, dict[str, np.ndarray]]:
    """Adapters llama.cpp loads, then ggml aborts (or segfaults) on while decoding."""
    a = np.ones((4, N_EMBD), np.float32)
    b = np.ones((N_EMBD, 4), np.float32)
    return {
        "3-D": {
            "blk.0.attn_q.weight.lora_a": np.stack([a, a]),
            "blk.0.attn_q.weight.lora_b": np.stack([b, b]),
        },
        "embedding rank": {
            "token_embd.weight.lora_a": np.ones((49152, 4), np.float32),
            "token_embd.weight.lora_b": np.ones((N_EMBD, 8), np.float32),
        },
        "int tensor": {
            "blk.0.attn_q.weight.lora_a": a.astype(np.int32),
            "blk.0.attn_q.weight.lora_b": b,
        },
        "lone A": {"blk.0.attn_q.weight.lora_a": a},
        "stray tensor": {"blk.0.attn_q.weight": np.ones((N_EMBD, N_EMBD), np.float32)},
    }


def bad_files(folder: Path) -> dict[str, Path]:
    """Files that must be refused, by why."""
    (folder / "text.gguf").write_text("not a GGUF\n")
    odd = {
        reason: write_lora(folder / f"{reason.replace(' ', '-')}.gguf", tensors)
        for reason, tensors in odd_tensors().items()
    }
    return {
        "missing": folder / "missing.gguf",
        "folder": folder,
        "text": folder / "text.gguf",
        "model": default_model_path(),
        "other architecture": write_lora(folder / "qwen.gguf", arch="qwen2"),
        "not an adapter": write_lora(folder / "model-type.gguf", general_type="model"),
        "alpha as text": write_lora(folder / "alpha.gguf", alpha="4"),
        "wrong shapes": write_lora(folder / "big.gguf", smol_lora_tensors(n_in=1024)),
        **odd,
    }


def test_bad_adapters_are_refused_and_the_active_set_stays(
    llm: Driver, lora_dir: Path, adapters: Callable[..., None], tmp_path: Path
) -> None:
    good = AdapterSpec(str(lora_dir / "lora.gguf"))
    adapters(good)
    adapted, _ = greedy(llm, "a3")
    for reason, path in bad_files(tmp_path).items():
        with pytest.raises(InvalidRequestError) as caught:
            adapters(good, AdapterSpec(str(path)))
        assert caught.value.param == "loras", reason
    for scale in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequestError):
            adapters(AdapterSpec(good.path, scale))
    with pytest.raises(InvalidRequestError, match="more than once"):
        adapters(good, good)
    assert llm.stats().alive
    assert greedy(llm, "a3")[0] == adapted


def test_running_sequence_goes_on_across_a_change_and_its_cache_is_dropped(
    llm: Driver, lora_dir: Path, adapters: Callable[..., None]
) -> None:
    prompt = llm.prompt(f"a4 {QUESTION}")

    async def scenario() -> tuple[int, FinishReason | None, int]:
        stream = llm.engine.generate(request(prompt, **{**GREEDY, "max_tokens": 16}))
        tokens = 0
        reason = None
        async for delta in stream:
            tokens += len(delta.token_ids)
            if tokens == 2:  # mid-generation
                await llm.engine.set_adapters([AdapterSpec(str(lora_dir / "lora.gguf"))])
            reason = delta.finish_reason or reason
        after = await llm.collect(request(prompt, **GREEDY))
        return tokens, reason, after.usage.cached_tokens

    tokens, reason, cached = asyncio.run(scenario())
    assert (tokens, reason) == (16, FinishReason.LENGTH)
    assert cached == 0  # the slot's KV mixes old and new weights: not a prefix cache


def test_close_frees_adapters_and_later_changes_are_refused(lora_dir: Path) -> None:
    engine = small_engine(ctx_size=128, parallel=1)
    driver = Driver(engine)
    asyncio.run(engine.set_adapters([AdapterSpec(str(lora_dir / "lora.gguf"))]))
    assert driver.run(driver.prompt("Hi"), **GREEDY).finish_reason is FinishReason.LENGTH
    asyncio.run(engine.close())
    with pytest.raises(ServiceUnavailableError):
        asyncio.run(engine.set_adapters([]))


def test_a_changed_file_is_loaded_again(
    llm: Driver, tmp_path: Path, adapters: Callable[..., None]
) -> None:
    path = write_lora(tmp_path / "changing.gguf", smol_lora_tensors(seed=1))
    adapters(AdapterSpec(str(path)))
    first, _ = greedy(llm, "a5")
    replacement = write_lora(tmp_path / "next.gguf", smol_lora_tensors(seed=2, std=0.1))
    shutil.move(replacement, path)
    adapters(AdapterSpec(str(path)))
    assert greedy(llm, "a5")[0] != first


def test_scheduler_invalidation_spares_running_sequences_but_not_their_cache() -> None:
    scheduler, memory = make_scheduler(slots=2)
    done, running = make_group(list(range(1, 11))), make_group(list(range(20, 31)))
    for group in (done, running):
        scheduler.add(group)
    scheduler.admit()
    run_prefill(scheduler, memory)
    scheduler.finish(done.sequences[0])
    scheduler.invalidate_prefix_cache()
    assert running.sequences[0] in scheduler.running
    free = scheduler.free_slots()
    assert len(free) == 1 and free[0].tokens == [] and memory.cells[free[0].seq_id] == []
    finish_all(scheduler)
    again = make_group(list(range(20, 31)))
    scheduler.add(again)
    scheduler.admit()
    assert again.cached_tokens == 0
