"""Find and open a Pixtral checkpoint: a local folder in either layout, or a hub repo id.

The layout is decided from the files present, never from tensor shapes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixtral_cpp.convert.config import PixtralConfig, parse_config_json, parse_params_json, read_json
from pixtral_cpp.convert.json_files import brief
from pixtral_cpp.convert.metadata import ModelInfo
from pixtral_cpp.convert.safetensors_reader import SafetensorsFile, TensorInfo
from pixtral_cpp.convert.tensor_map import canonical_hf_name
from pixtral_cpp.convert.tokenizer import Vocabulary, load_vocabulary
from pixtral_cpp.errors import CheckpointError, ConfigError, TensorError, UnsupportedCheckpointError

log = logging.getLogger(__name__)

NATIVE, HF = "native", "hf"
INDEX_FILE = "model.safetensors.index.json"
_CARD_BYTES_READ = 64 * 1024
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what conversion reads; never the multi-GB files of the other layout.
_HUB_METADATA_PATTERNS = ["params.json", "config.json", "tekken.json", "tokenizer.json", "README.md",
                          "model.safetensors.index.json", "preprocessor_config.json"]
_HUB_WEIGHT_PATTERNS = {NATIVE: ["consolidated*.safetensors"], HF: ["model*.safetensors"]}


@dataclass
class Checkpoint:
    """An opened checkpoint: parsed config, vocabulary and located (not loaded) tensors."""

    folder: Path
    layout: str
    config: PixtralConfig
    vocab: Vocabulary
    info: ModelInfo
    tensors: dict[str, TensorInfo]  # canonical source name (legacy prefixes for HF) -> location
    _files: dict[Path, SafetensorsFile] = field(default_factory=dict, repr=False)

    @property
    def weight_dtype(self) -> str:
        """The storage dtype of the matrices (bf16 for every published Pixtral)."""
        return next((t.dtype for t in self.tensors.values() if len(t.shape) >= 2), "F32")

    def array(self, tensor: TensorInfo) -> np.ndarray:
        """A read-only view of a tensor in its storage dtype."""
        return self._files[tensor.file].array(tensor)

    def prefetch(self, tensor: TensorInfo) -> None:
        """Start reading this tensor from disk in the background."""
        self._files[tensor.file].prefetch(tensor)

    def release(self, tensor: TensorInfo) -> None:
        """Done with this tensor: let its mapped pages leave the resident set."""
        self._files[tensor.file].release(tensor)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_layout(folder: Path) -> str:
    """'native' (params.json + consolidated*.safetensors) or 'hf' (config.json + model*.safetensors)."""
    if not folder.is_dir():
        raise UnsupportedCheckpointError(f"{folder}: not a folder")
    has_native = (folder / "params.json").is_file() and any(folder.glob("consolidated*.safetensors"))
    has_hf = (folder / "config.json").is_file() and any(folder.glob("model*.safetensors"))
    if has_native:
        if has_hf:
            log.info("%s holds both layouts; using the Mistral-native one", folder)
        return NATIVE
    if has_hf:
        return HF
    present = sorted(p.name for p in folder.iterdir())[:20]
    raise UnsupportedCheckpointError(
        f"{folder}: no Pixtral checkpoint found. Expected params.json + consolidated.safetensors + tekken.json "
        f"(Mistral format) or config.json + model*.safetensors + tokenizer.json (transformers format); "
        f"found: {', '.join(present) or 'nothing'}")


def open_checkpoint(folder: Path, *, context_length: int | None = None, source_url: str | None = None
                    ) -> Checkpoint:
    """Parse config and tokenizer and map every safetensors file of a local checkpoint."""
    folder = Path(folder)
    layout = detect_layout(folder)
    weight_map: dict[str, str] = {}
    if layout == NATIVE:
        config = parse_params_json(folder / "params.json", context_length)
        files = sorted(folder.glob("consolidated*.safetensors"))
    else:
        config = parse_config_json(folder / "config.json", context_length)
        files, weight_map = _hf_weight_files(folder)
    vocab = load_vocabulary(folder)
    _check_vocabulary(config, vocab, folder)
    info = ModelInfo(name=_model_name(folder), license=_license(folder), source_url=source_url)
    with contextlib.ExitStack() as on_error:
        opened = {path: on_error.enter_context(SafetensorsFile(path)) for path in files}
        _check_index(weight_map, opened, folder)
        tensors = _index_tensors(opened, layout)
        on_error.pop_all()  # success: the Checkpoint owns the open files now
    return Checkpoint(folder, layout, config, vocab, info, tensors, opened)


def _hf_weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards, and the index's tensor -> shard map (empty without an index)."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return sorted(folder.glob("model*.safetensors")), {}
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index_path}: no 'weight_map' object")
    for tensor, shard in weight_map.items():
        if not _is_shard_name(shard):
            # A path here could make the converter read any file on the machine ('../../etc/passwd').
            raise ConfigError(f"{index_path}: weight_map[{brief(tensor)}] is {brief(shard)}; expected the name "
                              f"of a .safetensors file inside the checkpoint folder")
    files = sorted({folder / name for name in weight_map.values()})
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise TensorError(f"{index_path}: lists shard(s) that are missing: {', '.join(missing)}")
    return files, weight_map


def _is_shard_name(name: object) -> bool:
    return (isinstance(name, str) and name.endswith(".safetensors") and name.isprintable()
            and Path(name).name == name and "\\" not in name and not name.startswith("."))


def _check_index(weight_map: dict[str, str], files: dict[Path, SafetensorsFile], folder: Path) -> None:
    """Every tensor the index lists is in the shard it names (index and shards from one download)."""
    for tensor, shard in weight_map.items():
        if tensor not in files[folder / shard].tensors:
            raise TensorError(f"{folder / INDEX_FILE}: lists tensor {brief(tensor)} in {shard}, which does not "
                              f"hold it; the index and the shards do not belong together (re-download them)")


def _index_tensors(files: dict[Path, SafetensorsFile], layout: str) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files.values():
        for name, info in f.tensors.items():
            key = canonical_hf_name(name) if layout == HF else name
            if key in tensors:
                other = tensors[key]
                raise TensorError(f"tensor '{name}' in {f.path.name} is the same tensor as "
                                  f"'{other.name}' in {other.file.name}; a checkpoint must hold it once")
            tensors[key] = info
    return tensors


def _check_vocabulary(config: PixtralConfig, vocab: Vocabulary, folder: Path) -> None:
    if len(vocab.tokens) != config.text.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {len(vocab.tokens)} tokens but the config says "
                          f"vocab_size {config.text.vocab_size}; tokenizer and weights do not belong together")
    img = vocab.id_of("[IMG]")
    if config.image_token_id is not None and config.image_token_id != img:
        raise ConfigError(f"{folder}: the config's image token id is {config.image_token_id} but the "
                          f"tokenizer has [IMG] at {img}")


def _model_name(folder: Path) -> str:
    # Hub snapshots live in .../models--org--name/snapshots/<sha>; name them after the repo.
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.resolve().name


def _license(folder: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, when the card is there."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    try:
        with open(card, "rb") as handle:  # the front matter is at the top; a card is never read whole
            text = handle.read(_CARD_BYTES_READ).decode("utf-8", errors="replace")
    except OSError:  # the card is optional; an unreadable one only costs the license field
        return None
    front = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*['\"]?([\w.-]+)", front.group(1), re.M) if front else None
    return found.group(1) if found else None


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and not Path(source).exists()


def fetch_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) only the files conversion needs; honours HF_* env vars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_METADATA_PATTERNS))
        layout = NATIVE if (folder / "params.json").is_file() else HF
        patterns = _HUB_METADATA_PATTERNS + _HUB_WEIGHT_PATTERNS[layout]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and cannot be downloaded "
                              f"(offline or no network): {exc}") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{repo_id}: download failed ({exc}); for gated repos log in with "
                              f"`hf auth login` or set HF_TOKEN") from None


def hub_url(repo_id: str) -> str:
    return f"https://huggingface.co/{repo_id}"

