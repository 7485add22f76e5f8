"""The GGUF header scanner agrees with gguf's GGUFReader, at a fraction of its cost."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from llmserve.engines.llamacpp.gguf_header import GGUFHeaderError, read_header
from llmserve.engines.llamacpp.inspect import InvalidModelFileError, inspect_gguf
from llmserve.models.defaults import default_model_path


def test_tensor_extents_and_keys_match_gguf_reader() -> None:
    path = Path(default_model_path())
    reader = gguf.GGUFReader(str(path))
    header = read_header(path)
    expected = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    assert {t.name: (t.start, t.n_bytes) for t in header.tensors} == expected
    assert set(header.metadata) == set(reader.fields) - {
        "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"
    }  # fmt: skip
    for key in ("llama.block_count", "llama.context_length", "general.architecture"):
        assert (header.metadata[key].value or header.metadata[key].number) == (
            reader.fields[key].contents()
        )


def write_model(path: Path, heads_kv: list[int] | int) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_context_length(512)
    writer.add_head_count(8)
    writer.add_key_value("llama.attention.head_count_kv", heads_kv, _kind(heads_kv))
    writer.add_tensor("t0", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("t1", np.ones((8,), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _kind(value: list[int] | int) -> gguf.GGUFValueType:
    return gguf.GGUFValueType.ARRAY if isinstance(value, list) else gguf.GGUFValueType.UINT32


@pytest.mark.parametrize("heads_kv", [4, [2, 4]])
def test_summary_of_a_written_model(tmp_path: Path, heads_kv: list[int] | int) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, heads_kv)
    summary = inspect_gguf(path)
    assert (summary.block_count, summary.context_length) == (2, 512)
    assert summary.kv_bytes_per_token == 2 * 2 * (64 // 8 * 4) * 2  # the largest head_count_kv
    tensors = read_header(path).tensors
    assert [(t.name, t.n_bytes) for t in tensors] == [("t0", 4 * 64 * 4), ("t1", 8 * 2)]
    assert 0 <= path.stat().st_size - tensors[-1].end < 32  # the writer pads to 32 bytes


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, 4)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: read_header(path).tensors[-1].end - 1])  # it ends past the file
    with pytest.raises(InvalidModelFileError, match="truncated"):
        inspect_gguf(cut)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:40])  # the metadata runs past the end
    with pytest.raises(GGUFHeaderError):
        read_header(header_only)
    with pytest.raises(InvalidModelFileError, match="not a readable GGUF"):
        inspect_gguf(header_only)
