"""PEFT adapter folders: found in loras_dir beside GGUF files, and checked before vLLM reads them.

The checks import nothing of vLLM, so they run in the main venv; the adapters' effect on
generation is tested on the real engine in tests/vllm/test_vllm_lora.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmserve.core.errors import InvalidRequestError, NotFoundError
from llmserve.engines.base import AdapterSpec
from llmserve.engines.vllm.adapters import check_adapter, check_adapters
from llmserve.models.registry import list_adapters, resolve_adapter
from tests.lora_file import write_lora, write_peft_lora


@pytest.fixture
def loras(tmp_path: Path) -> Path:
    write_peft_lora(tmp_path / "peft")
    write_peft_lora(tmp_path / "family" / "nested")
    write_lora(tmp_path / "ggml.gguf")
    (tmp_path / "plain-folder").mkdir()
    return tmp_path


def refusal(spec: AdapterSpec, max_rank: int = 16) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        check_adapter(spec, max_rank)
    assert caught.value.param == "loras"
    return caught.value.message


def test_adapters_are_gguf_files_and_peft_folders(loras: Path) -> None:
    assert [entry.name for entry in list_adapters(loras)] == ["ggml", "nested", "peft"]
    assert resolve_adapter(loras, "peft") == (loras / "peft").absolute()
    assert resolve_adapter(loras, "nested") == (loras / "family" / "nested").absolute()
    assert resolve_adapter(loras, "ggml") == (loras / "ggml.gguf").absolute()
    with pytest.raises(NotFoundError):
        resolve_adapter(loras, "plain-folder")
    with pytest.raises(InvalidRequestError):
        resolve_adapter(loras, "../peft")


def test_a_peft_folder_is_accepted_with_its_rank(loras: Path) -> None:
    adapter = check_adapter(AdapterSpec(str(loras / "peft")), max_rank=16)
    assert (adapter.name, adapter.rank, adapter.path) == ("peft", 4, str(loras / "peft"))


def test_a_rewritten_folder_gets_a_new_identity(loras: Path) -> None:
    before = check_adapter(AdapterSpec(str(loras / "peft")), 16).signature
    write_peft_lora(loras / "peft", zero=True)
    assert check_adapter(AdapterSpec(str(loras / "peft")), 16).signature != before


def test_more_than_one_adapter_is_refused_by_name(loras: Path) -> None:
    specs = [AdapterSpec(str(loras / "peft")), AdapterSpec(str(loras / "family" / "nested"))]
    with pytest.raises(InvalidRequestError, match=r"one LoRA adapter at a time.*peft, nested"):
        check_adapters(specs, 16)
    assert check_adapters([], 16) is None


@pytest.mark.parametrize("scale", [0.5, 2.0, float("nan")])
def test_a_scale_other_than_one_is_refused(loras: Path, scale: float) -> None:
    assert "scaling must be 1.0" in refusal(AdapterSpec(str(loras / "peft"), scale))


def test_a_gguf_file_is_refused_with_the_kind_vllm_takes(loras: Path) -> None:
    assert "PEFT adapter folders" in refusal(AdapterSpec(str(loras / "ggml.gguf")))


def test_a_rank_above_the_limit_names_the_setting(loras: Path) -> None:
    write_peft_lora(loras / "wide", rank=32)
    assert "--max-lora-rank" in refusal(AdapterSpec(str(loras / "wide")), max_rank=16)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{not json", "not readable JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"peft_type": "PREFIX_TUNING", "r": 4}), "not a LoRA adapter"),
        (json.dumps({"peft_type": "LORA", "r": 0}), "positive integer rank"),
        (json.dumps({"peft_type": "LORA", "r": True}), "positive integer rank"),
    ],
)
def test_a_damaged_config_is_refused(loras: Path, config: str, expected: str) -> None:
    (loras / "peft" / "adapter_config.json").write_text(config)
    assert expected in refusal(AdapterSpec(str(loras / "peft")))


def test_missing_weights_or_folder_are_refused(loras: Path) -> None:
    (loras / "peft" / "adapter_model.safetensors").unlink()
    assert "no adapter weights" in refusal(AdapterSpec(str(loras / "peft")))
    assert "not found" in refusal(AdapterSpec(str(loras / "gone")))
