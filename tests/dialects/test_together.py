"""Together's legacy /inference on the real default model: the seed verbatim, httpx, and the
legacy `together` SDK (0.2.11) as a real client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import together

from tests.dialects.conftest import API_KEY, AUTH
from tests.server import RunningServer

SEED = Path(__file__).parent.parent / "seeds" / "data" / "together_inference.json"
COUNTING = "1, 2, 3, 4,"  # greedy: " 5, 6, 7, 8, 9, ..."
HI_CHAT = (  # greedy: a short greeting, then EOS
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
)


def infer(server: RunningServer, path: str = "/inference", **body: Any) -> dict[str, Any]:
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_seed_request_verbatim(dialect_server: RunningServer) -> None:
    sent = SEED.read_bytes()
    r = httpx.post(
        dialect_server.url + "/inference",
        content=sent,
        headers={"Authorization": "Bearer YOUR_API_KEY", "Content-Type": "application/json"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    data = r.json()
    request = json.loads(sent)
    assert data["status"] == "finished"
    assert data["prompt"] == [request["prompt"]]
    assert data["model"] == "togethercomputer/RedPajama-INCITE-7B-Instruct"
    assert data["model_owner"] == ""
    assert data["tags"] == {}
    assert data["num_returns"] == 1
    assert data["args"] == request
    assert data["subjobs"] == []
    output = data["output"]
    assert output["result_type"] == "language-model-inference"
    assert isinstance(output["raw_compute_time"], float) and output["raw_compute_time"] > 0
    [choice] = output["choices"]
    assert set(choice) == {"text", "finish_reason", "index"}
    assert choice["index"] == 0 and isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("length", "eos_token")
    assert data["choices"] == output["choices"]
    assert isinstance(data["id"], str) and data["id"]
    # max_tokens: 1 means exactly one token.
    assert data["usage"]["completion_tokens"] == 1
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 1


def test_api_inference_path_and_model_echo(dialect_server: RunningServer) -> None:
    named = infer(
        dialect_server,
        "/api/inference",
        model="my/model",
        prompt=COUNTING,
        max_tokens=2,
        temperature=0,
    )
    assert named["model"] == named["args"]["model"] == "my/model"
    unnamed = infer(dialect_server, prompt=COUNTING, max_tokens=2, temperature=0)
    assert unnamed["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert "model" not in unnamed["args"]
    assert unnamed["choices"][0]["text"] == named["choices"][0]["text"]


def test_null_fields_mean_default(dialect_server: RunningServer) -> None:
    nulls = dict.fromkeys(
        [
            "model",
            "max_tokens",
            "stop",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "n",
            "logprobs",
            "stream_tokens",
        ]
    )
    data = infer(dialect_server, prompt=HI_CHAT, **nulls)
    assert data["num_returns"] == 1 and len(data["choices"]) == 1
    assert 0 < data["usage"]["completion_tokens"] <= 128  # the legacy SDK's default max_tokens
    assert "logprobs" not in data["choices"][0]
    assert data["args"] == {"prompt": HI_CHAT, **nulls}


def test_finish_reasons_in_togethers_words(dialect_server: RunningServer) -> None:
    eos = infer(dialect_server, prompt=HI_CHAT, max_tokens=32, temperature=0)
    assert eos["choices"][0]["finish_reason"] == "eos_token"
    length = infer(dialect_server, prompt=COUNTING, max_tokens=4, temperature=0)
    assert length["choices"][0]["finish_reason"] == "length"
    free = infer(dialect_server, prompt=COUNTING, max_tokens=16, temperature=0)
    text = free["choices"][0]["text"]
    stopped = infer(dialect_server, prompt=COUNTING, max_tokens=16, temperature=0, stop=[" 8"])
    assert stopped["choices"][0]["finish_reason"] == "stop_sequence"
    assert stopped["choices"][0]["text"] == text[: text.index(" 8")]


def test_sampling_fields(dialect_server: RunningServer) -> None:
    def text(**fields: Any) -> str:
        return str(
            infer(dialect_server, prompt="Once upon a time", max_tokens=16, **fields)["choices"][0][
                "text"
            ]
        )

    greedy = text(temperature=0)
    # top_k 1 or a tiny top_p leaves one candidate: hot sampling becomes greedy.
    assert text(temperature=1.5, top_k=1) == greedy
    assert text(temperature=1.5, top_p=0.01) == greedy
    assert text(temperature=0, repetition_penalty=1.5) != greedy


def test_n_and_logprobs(dialect_server: RunningServer) -> None:
    data = infer(
        dialect_server, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=2, logprobs=1
    )
    assert data["num_returns"] == 2
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert data["usage"]["completion_tokens"] == 16
    for choice in data["choices"]:
        assert len(choice["logprobs"]) == 8
        assert all(isinstance(lp, float) and lp <= 0 for lp in choice["logprobs"])


def test_stream_tokens(dialect_server: RunningServer) -> None:
    expected = infer(dialect_server, prompt=COUNTING, max_tokens=8, temperature=0)
    body = {"prompt": COUNTING, "max_tokens": 8, "temperature": 0, "stream_tokens": True}
    with httpx.stream(
        "POST", dialect_server.url + "/inference", json=body, headers=AUTH, timeout=120
    ) as r:
        assert r.status_code == 200
        raw = r.read().decode()
    lines = [line for line in raw.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


# ---- the legacy together SDK ----


@pytest.fixture
def together_sdk(dialect_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the legacy SDK (module-level settings) at the test server, with the seed's key."""
    monkeypatch.setattr(together, "api_key", API_KEY)
    monkeypatch.setattr(together, "api_base_complete", dialect_server.url + "/api/inference")


@pytest.mark.usefixtures("together_sdk")
def test_together_sdk_complete_and_stream() -> None:
    args: dict[str, Any] = {
        "prompt": COUNTING,
        "model": "togethercomputer/RedPajama-INCITE-7B-Instruct",
        "max_tokens": 8,
        "temperature": 0.0,
    }
    response = together.Complete.create(**args, cast=True)
    assert isinstance(response, together.types.TogetherResponse)
    assert response.choices is not None
    text = response.choices[0].text
    assert text and response.choices[0].finish_reason == "length"

    assert "".join(together.Complete.create_streaming(**args)) == text
    chunks = list(together.Complete.create_streaming(**args, cast=True))
    assert all(isinstance(c, together.types.TogetherResponse) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text


@pytest.mark.usefixtures("together_sdk")
def test_together_sdk_stop_and_dict_response() -> None:
    data = together.Complete.create(prompt=COUNTING, max_tokens=16, temperature=0.0, stop=[" 8"])
    assert isinstance(data, dict)
    assert data["output"]["choices"][0]["finish_reason"] == "stop_sequence"
    assert " 8" not in data["output"]["choices"][0]["text"]
