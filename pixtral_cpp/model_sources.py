"""What `--model` names, as a GGUF pair on disk: a .gguf file, a folder, `FOLDER:QUANT`, or a hub repo
`user/repo[@REVISION][:QUANT]` (pulled into the Hugging Face cache); without one, $PIXTRAL_CPP_MODEL, then the
default models folder, then the default hub model if the cache already holds it.

A path that exists wins over a hub spec of the same spelling. Folders follow the hub's rule
(pixtral_cpp.model_select): Q4_K_M, then Q8_0, then the first text model, saying which was taken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pixtral_cpp.defaults import DEFAULT_HUB_MODEL
from pixtral_cpp.errors import ModelError
from pixtral_cpp.model_files import MODEL_ENV, ModelFiles
from pixtral_cpp.model_select import Choice, choose_mmproj_file, choose_text_file, is_gguf, is_text_model
from pixtral_cpp.paths import default_models_dir

if TYPE_CHECKING:
    from pixtral_cpp.hub_models import ByteProgress, HubPlan

HOW_TO_GET_ONE = (f"pull one with `pixtral-cpp pull {DEFAULT_HUB_MODEL}`, convert a checkpoint with "
                  "`pixtral-cpp convert mistralai/Pixtral-12B-2409`, or pass --model PATH or --model user/repo")


@dataclass(frozen=True)
class ResolvedModel:
    """The pair, where it came from (for messages), and what was chosen among several files."""

    files: ModelFiles
    origin: str
    notes: tuple[str, ...] = ()


def resolve_model(model: Path | str | None = None, mmproj: Path | str | None = None,
                  mmproj_quant: str | None = None, *, progress: ByteProgress | None = None) -> ResolvedModel:
    """The pair `model` names (see the module docstring); `progress` sees the downloads of a hub repo."""
    named = str(model) if model else os.environ.get(MODEL_ENV)
    if not named:
        return _default_model(mmproj, mmproj_quant)
    origin = "--model" if model else MODEL_ENV
    path = Path(named).expanduser()
    if path.is_file():
        return _with_mmproj(path, _choose_in_folder(path.parent, path.name, mmproj, mmproj_quant), origin)
    if path.is_dir():
        return _from_folder(path, None, mmproj, mmproj_quant, origin)
    folder, _, quant = named.rpartition(":")
    if folder and quant and Path(folder).expanduser().is_dir():
        return _from_folder(Path(folder).expanduser(), quant, mmproj, mmproj_quant, origin)
    from pixtral_cpp.hub_models import looks_like_hub_spec

    if looks_like_hub_spec(named):
        return _from_hub(named, mmproj, mmproj_quant, progress, origin)
    raise ModelError(f"no model at {path} ({origin}); {HOW_TO_GET_ONE}")


def _from_folder(folder: Path, quant: str | None, mmproj: Path | str | None, mmproj_quant: str | None,
                 origin: str) -> ResolvedModel:
    text = choose_text_file(_gguf_names(folder), quant, where=str(folder))
    files = _with_mmproj(folder / text.name, _choose_in_folder(folder, text.name, mmproj, mmproj_quant), origin)
    return ResolvedModel(files.files, origin, tuple(n for n in (text.note, *files.notes) if n))


def _choose_in_folder(folder: Path, text_name: str, mmproj: Path | str | None,
                      mmproj_quant: str | None) -> Choice | Path:
    """The explicit --mmproj, else the folder's projector by the hub rule."""
    if mmproj is not None:
        return _explicit_mmproj(mmproj)
    return choose_mmproj_file(_gguf_names(folder), text_name, mmproj_quant, where=str(folder))


def _with_mmproj(text: Path, mmproj: Choice | Path, origin: str) -> ResolvedModel:
    if isinstance(mmproj, Path):
        return ResolvedModel(ModelFiles(text, mmproj), origin)
    return ResolvedModel(ModelFiles(text, text.parent / mmproj.name), origin, (mmproj.note,) if mmproj.note else ())


def _gguf_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if is_gguf(p.name) and p.is_file())
    except OSError as exc:
        raise ModelError(f"cannot read the folder {folder}: {exc.strerror or exc}") from None


def _from_hub(spec: str, mmproj: Path | str | None, mmproj_quant: str | None, progress: ByteProgress | None,
              origin: str) -> ResolvedModel:
    from pixtral_cpp.hub_models import pull

    try:
        pulled = pull(spec, mmproj_quant=mmproj_quant, progress=progress)
    except ModelError as exc:
        if "not in the local Hugging Face cache" in str(exc) or str(exc).startswith("no repo "):  # maybe a typo
            raise ModelError(f"{exc} (read {spec!r} as a hub repo: no file or folder has that name)") from None
        raise
    files = pulled.files if mmproj is None else ModelFiles(pulled.files.text, _explicit_mmproj(mmproj))
    return ResolvedModel(files, f"{origin} {spec}", pulled.notes)


def _explicit_mmproj(mmproj: Path | str) -> Path:
    explicit = Path(mmproj).expanduser()
    if not explicit.is_file():
        raise ModelError(f"mmproj {explicit} does not exist")
    return explicit


def _default_model(mmproj: Path | str | None, mmproj_quant: str | None) -> ResolvedModel:
    """The default models folder when it holds a text model, else the default hub model if the cache has it."""
    folder = default_models_dir()
    if _holds_text_model(folder):
        return _from_folder(folder, None, mmproj, mmproj_quant, "the default models folder")
    if _default_hub_plan(mmproj_quant) is not None:
        from pixtral_cpp.hub_models import pull

        pulled = pull(DEFAULT_HUB_MODEL, mmproj_quant=mmproj_quant, offline=True)
        files = pulled.files if mmproj is None else ModelFiles(pulled.files.text, _explicit_mmproj(mmproj))
        return ResolvedModel(files, f"the default model {DEFAULT_HUB_MODEL} (Hugging Face cache)", pulled.notes)
    raise ModelError(f"no model in the default models folder ({folder}) or the Hugging Face cache; {HOW_TO_GET_ONE}")


def _holds_text_model(folder: Path) -> bool:
    return folder.is_dir() and any(is_text_model(n) for n in _gguf_names(folder))


def _default_hub_plan(mmproj_quant: str | None) -> HubPlan | None:
    """The default hub model's files if the local cache holds all of them (no network), else None."""
    from pixtral_cpp.hub_models import hub_cache_dir, list_cached_repo, parse_hub_spec, plan_pull

    spec = parse_hub_spec(DEFAULT_HUB_MODEL)
    listing = spec and list_cached_repo(spec.repo_id, spec.revision or "main", hub_cache_dir())
    if not spec or listing is None:
        return None
    try:
        return plan_pull(spec, listing, mmproj_quant)
    except ModelError:
        return None  # the cache holds only part of it: as good as nothing


def model_available_without_download() -> bool:
    """Whether a run without --model finds a model here; a first run offers to pull one when not."""
    return bool(os.environ.get(MODEL_ENV)) or _holds_text_model(default_models_dir()) \
        or _default_hub_plan(None) is not None
