"""POST /v1/embeddings on the real default model through the real engine, with the openai SDK."""

from __future__ import annotations

import base64
import dataclasses
import struct
import threading
from collections.abc import Iterator

import gguf
import httpx
import numpy as np
import openai
import pytest

from llmserve.app import create_app
from llmserve.config import Settings
from llmserve.core.templates import load_template
from llmserve.engines.base import Capabilities
from llmserve.engines.llamacpp.embedding import Pooling, resolve_pooling
from llmserve.models.defaults import default_model_path
from llmserve.models.manager import ModelManager
from tests.conftest import TEST_SETTINGS
from tests.fake_engine import FakeEngine
from tests.server import RunningServer, serve

CAT = "The cat sat on the mat."
BREAD = "How do I bake bread?"
TEXTS = [
    CAT,
    "A kitten was resting on the rug.",
    "Quarterly revenue rose by four percent.",
    BREAD,
    "Steps for making a loaf at home",
    "The train leaves at noon.",
]


@pytest.fixture(scope="module")
def n_embd() -> int:
    """The default model's embedding length, read from its GGUF."""
    field = gguf.GGUFReader(default_model_path()).fields["llama.embedding_length"]
    return int(field.contents())


def vectors(client: openai.OpenAI, inputs: list[str] | list[list[int]]) -> np.ndarray:
    """The float vectors of `inputs`, as rows."""
    r = client.embeddings.create(model="any", input=inputs, encoding_format="float")
    return np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])


def post(server: RunningServer, path: str, body: object) -> httpx.Response:
    """POST JSON to the server (the machine may be busy: a generous timeout)."""
    return httpx.post(server.url + path, json=body, timeout=120)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_shapes_and_usage(client: openai.OpenAI, n_embd: int) -> None:
    r = client.embeddings.create(
        model="text-embedding-3-small", input=TEXTS[:3], encoding_format="float", user="u-1"
    )
    assert r.object == "list"
    assert r.model == "SmolLM2-135M-Instruct.Q4_1"
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in r.data)
    assert all(len(d.embedding) == n_embd for d in r.data)
    assert r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens


def test_single_string_and_usage_counts_tokens(real_server: RunningServer) -> None:
    tokens = post(real_server, "/tokenize", {"prompt": CAT}).json()["tokens"]
    r = post(real_server, "/v1/embeddings", {"input": CAT})
    assert r.status_code == 200
    body = r.json()
    assert len(body["data"]) == 1 and isinstance(body["data"][0]["embedding"], list)
    assert body["usage"] == {"prompt_tokens": len(tokens), "total_tokens": len(tokens)}


def test_base64_decodes_to_the_float_vectors(
    client: openai.OpenAI, real_server: RunningServer
) -> None:
    floats = vectors(client, TEXTS[:2])
    raw = post(
        real_server, "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "base64"}
    ).json()
    for row, item in zip(floats, raw["data"], strict=True):
        assert isinstance(item["embedding"], str)
        data = base64.b64decode(item["embedding"])
        decoded = struct.unpack(f"<{len(data) // 4}f", data)
        assert np.array_equal(np.array(decoded), row.astype(np.float32))
    # The SDK asks for base64 by default and decodes it itself.
    sdk = client.embeddings.create(model="any", input=TEXTS[:2])
    assert np.array_equal(np.array([d.embedding for d in sdk.data]), floats)


def test_deterministic(client: openai.OpenAI) -> None:
    assert np.array_equal(vectors(client, TEXTS), vectors(client, TEXTS))
    # A vector does not depend on what else is in the request.
    alone = vectors(client, [TEXTS[4]])[0]
    assert np.allclose(alone, vectors(client, TEXTS)[4], atol=1e-5)


def test_normalized(client: openai.OpenAI) -> None:
    norms = np.linalg.norm(vectors(client, TEXTS), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)


def test_token_ids_equal_string(client: openai.OpenAI, real_server: RunningServer) -> None:
    ids = [post(real_server, "/tokenize", {"prompt": text}).json()["tokens"] for text in TEXTS[:2]]
    from_text = vectors(client, TEXTS[:2])
    assert np.array_equal(vectors(client, ids), from_text)
    assert np.array_equal(vectors(client, ids[0]), from_text[:1])  # one list of token ids


def test_similar_texts_score_higher(client: openai.OpenAI) -> None:
    cat, kitten, revenue, bread, loaf, train = vectors(client, TEXTS)
    assert cosine(cat, kitten) > cosine(cat, revenue)
    assert cosine(bread, loaf) > cosine(bread, train)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi", "dimensions": 64}, "dimensions"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": [[1, 2], [49152]]}, "input"),  # out of the vocabulary
        ({"input": [[1] * 2049]}, "input"),  # longer than the context (2048)
        ({"input": [[1] * 2000] * 33}, "input"),  # 66,000 tokens: more than 65,536 in all
    ],
)
def test_bad_requests_are_400(
    real_server: RunningServer, body: dict[str, object], param: str
) -> None:
    r = post(real_server, "/v1/embeddings", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_sdk_error_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="any", input="hello", dimensions=8)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]


# ---- embeddings do not stop running streams ---------------------------------------------


@pytest.fixture(scope="module")
def small_chunk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The default model with 16-token steps, so a modest embedding request takes many steps."""
    tokens = tmp_path_factory.mktemp("embed") / "api_tokens.yml"
    settings = Settings(
        disable_auth=True, api_tokens_file=tokens, **{**TEST_SETTINGS, "prefill_chunk": 16}
    )
    with serve(create_app(settings)) as server:
        yield server


def test_chunked_input_pools_like_one_call(
    small_chunk_server: RunningServer, client: openai.OpenAI
) -> None:
    """A ~300-token input in 16-token steps gives the vector of one 512-token step."""
    text = " ".join(TEXTS) * 6
    chunked = openai.OpenAI(base_url=small_chunk_server.url + "/v1", api_key="x", max_retries=0)
    many_steps = vectors(chunked, [text])[0]
    one_step = vectors(client, [text])[0]
    assert cosine(many_steps, one_step) > 0.9999
    assert np.allclose(many_steps, one_step, atol=5e-3)


def test_embedding_during_a_stream_keeps_it_flowing(small_chunk_server: RunningServer) -> None:
    """Tokens keep coming between the embedding request's send and its answer.

    ~600 input tokens at 16 per step need ~38 steps; a stream decodes a token at each of them.
    Embedding them in one piece of engine work would leave only the tokens produced while the
    request travels and is tokenized (a handful), well below the bound asserted here.
    """
    client = openai.OpenAI(base_url=small_chunk_server.url + "/v1", api_key="x", max_retries=0)
    received: list[str] = []
    started = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        stream = client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "Count from one to a thousand."}],
            max_tokens=1500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
                    if len(received) >= 3:
                        started.set()
                if stop.is_set():
                    break

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        assert started.wait(120), "the stream produced no tokens"
        before = len(received)
        inputs = [f"{TEXTS[i % len(TEXTS)]} Sentence number {i}. " * 6 for i in range(8)]
        r = client.embeddings.create(model="any", input=inputs, encoding_format="float")
        during = len(received) - before
        assert r.usage.prompt_tokens > 500
        assert len(r.data) == 8
        assert reader.is_alive(), "the stream ended before the embeddings did"
        assert during >= 20, f"only {during} tokens streamed while embedding"
    finally:
        stop.set()
        reader.join(120)


# ---- the HTTP layer on the fake engine ----------------------------------------------------


def test_fake_engine_vectors_in_input_order(fake_server: RunningServer) -> None:
    body = {"model": "fake-alias", "input": ["aaa", "bbb", "a1"], "encoding_format": "base64"}
    r = post(fake_server, "/v1/embeddings", body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    decoded = [struct.unpack("<4f", base64.b64decode(d["embedding"])) for d in data]
    # FakeEngine's vectors: (vowels, other letters, digits, rest), normalized.
    assert np.allclose(decoded[0], [1, 0, 0, 0]) and np.allclose(decoded[1], [0, 1, 0, 0])
    assert np.allclose(decoded[2], [2**-0.5, 0, 2**-0.5, 0], atol=1e-6)
    assert r.json()["model"] == "fake-model"
    assert r.json()["usage"] == {"prompt_tokens": 8, "total_tokens": 8}


@pytest.fixture(scope="module")
def no_embeddings_server() -> Iterator[RunningServer]:
    """The fake engine declaring it has no embeddings."""
    engine = FakeEngine()
    engine.info = dataclasses.replace(engine.info, capabilities=Capabilities(embeddings=False))
    settings = Settings(disable_auth=True)
    manager = ModelManager(settings)
    manager.register(engine, ["fake-model"], load_template(None, "gguf"))
    with serve(create_app(settings, manager)) as server:
        yield server


def test_engine_without_embeddings_is_400(no_embeddings_server: RunningServer) -> None:
    r = post(no_embeddings_server, "/v1/embeddings", {"input": "hello"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == "model"


def test_pooling_choice() -> None:
    assert resolve_pooling(None, None) is Pooling.MEAN  # the default GGUF declares none
    assert resolve_pooling(None, "0") is Pooling.MEAN  # NONE gives no single vector
    assert resolve_pooling(None, "2") is Pooling.CLS
    assert resolve_pooling(None, "3") is Pooling.LAST
    assert resolve_pooling(None, "4") is None  # a reranker
    assert resolve_pooling("last", "1") is Pooling.LAST  # the setting wins
