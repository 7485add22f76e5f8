"""A copy of a GGUF model with fill-in-the-middle token ids set in its metadata."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter

# Token ids given the FIM roles in the copy (any distinct special tokens of the default model).
FIM = {"fim_pre": 7, "fim_suf": 8, "fim_mid": 9}


def write_fim_copy(source: Path, target: Path, tokens: dict[str, int]) -> None:
    """A copy of a GGUF model with FIM token ids set in its tokenizer metadata."""
    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(target, arch)  # writes general.architecture itself
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind is GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub)
    for role, token in tokens.items():
        writer.add_uint32(f"tokenizer.ggml.{role}_token_id", token)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.n_bytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
