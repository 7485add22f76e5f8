"""Files in the folders llmserve serves from (models, LoRAs, templates, presets), by safe name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmserve.core.errors import InvalidRequestError, NotFoundError
from llmserve.engines.base import ADAPTER_FOLDER_MARKER

LORA_SUFFIXES = (".gguf",)
PRESET_SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True)
class FileEntry:
    """A named file in one of the served folders."""

    name: str
    path: Path


def list_files(root: Path, suffixes: tuple[str, ...], depth: int = 1) -> list[FileEntry]:
    """Files with `suffixes` in `root` and up to `depth` levels of sub-folders, by name."""
    if not root.is_dir():
        return []
    found: list[FileEntry] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and path.suffix in suffixes and len(relative.parts) <= depth + 1:
            found.append(FileEntry(path.stem, path))
    return found


def list_folders(root: Path, marker: str, depth: int = 1) -> list[FileEntry]:
    """Folders holding a `marker` file (an HF model's config.json) in `root` and sub-folders."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob(marker)):
        folder = path.parent
        if folder != root and len(folder.relative_to(root).parts) <= depth + 1:
            found.append(FileEntry(folder.name, folder))
    return found


def resolve_folder(root: Path, name: str, marker: str, what: str) -> Path:
    """The folder called `name` inside `root` that holds `marker`; names never escape it."""
    _check_name(root, name, what)
    candidate = root / name
    if (candidate / marker).is_file():
        return candidate.absolute()
    for entry in list_folders(root, marker):
        if entry.name == name:
            return entry.path.absolute()
    raise NotFoundError(f"no {what} called {name!r} in {root}", param="name")


def _check_name(root: Path, name: str, what: str) -> None:
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise InvalidRequestError(
            f"{what} names are plain names inside {root}, got {name!r}", param="name"
        )


def resolve_file(root: Path, name: str, suffixes: tuple[str, ...], what: str) -> Path:
    """The file called `name` inside `root`; names never escape the folder."""
    _check_name(root, name, what)
    # The name check above keeps lookups inside `root`; symlinks placed there by the admin are
    # followed on purpose (models often live elsewhere on disk).
    for candidate in [root / name, *(root / f"{name}{suffix}" for suffix in suffixes)]:
        if candidate.is_file() and candidate.suffix in suffixes:
            return candidate.absolute()
    for entry in list_files(root, suffixes):
        if entry.name == name:
            return entry.path.absolute()
    raise NotFoundError(f"no {what} called {name!r} in {root}", param="name")


def list_adapters(root: Path) -> list[FileEntry]:
    """LoRA adapters in `root`: GGUF files (llama.cpp) and PEFT folders (vLLM), by name."""
    entries = list_files(root, LORA_SUFFIXES) + list_folders(root, ADAPTER_FOLDER_MARKER)
    return sorted(entries, key=lambda entry: entry.name)


def resolve_adapter(root: Path, name: str) -> Path:
    """The adapter called `name` in `root`: a GGUF file, else a PEFT folder (the engine checks
    it is the kind it takes)."""
    try:
        return resolve_file(root, name, LORA_SUFFIXES, "LoRA")
    except NotFoundError:
        return resolve_folder(root, name, ADAPTER_FOLDER_MARKER, "LoRA")
