"""The models available on this machine without a download: what `convert` wrote into the default models folder
and the Pixtral GGUF repos in the Hugging Face cache (pulled, or fetched by llama.cpp or anything else), with
whether each runs as is (pixtral_cpp.model_files.inspect_pair); and their removal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pixtral_cpp.errors import ModelError
from pixtral_cpp.model_files import ModelFiles, inspect_pair
from pixtral_cpp.model_select import choose_mmproj_file, choose_text_file, is_mmproj, quant_of, split_name, text_quants
from pixtral_cpp.paths import default_models_dir

CONVERTED, HUB_CACHE = "converted", "hub cache"


@dataclass(frozen=True)
class LocalModel:
    name: str  # what `models rm` takes: user/repo, or the model name `convert` gave the files
    kind: str  # CONVERTED or HUB_CACHE
    model_arg: str  # what --model takes to run it
    where: Path
    quants: tuple[str, ...]
    size_bytes: int
    paths: tuple[Path, ...]  # every file of it (converted models: what `rm` deletes)
    problem: str | None  # None: the default pair runs; else the first reason it would not
    revisions: tuple[str, ...] = ()  # commits in the cache (what `rm` deletes)
    correction: str | None = None  # what pixtral-cpp corrects at load to run it faithfully (pair_quirks)

    @property
    def runs(self) -> str:
        """`ok` (as is), `corrected` (faithfully, with a correction at load) or `no`."""
        return "no" if self.problem is not None else "corrected" if self.correction else "ok"


def list_local_models(models_dir: Path | None = None, cache_dir: Path | None = None) -> list[LocalModel]:
    """Converted models first (by name), then the cache's Pixtral GGUF repos (by repo id)."""
    return [*_converted(models_dir or default_models_dir()), *_cached(cache_dir)]


def _converted(folder: Path) -> list[LocalModel]:
    """One entry per model name in the folder (`<Name>-<QUANT>.gguf` and `mmproj-<Name>-<QUANT>.gguf`)."""
    if not folder.is_dir():
        return []
    ggufs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    groups: dict[str, list[Path]] = {}
    for path in ggufs:
        groups.setdefault(_model_name(path.name), []).append(path)
    models = []
    for name, paths in sorted(groups.items()):
        names = [p.name for p in paths]
        if not text_quants(names):
            continue  # projectors alone are no model
        models.append(LocalModel(name, CONVERTED, f"{folder / choose_text_file(names).name}", folder,
                                 tuple(text_quants(names)), sum(p.stat().st_size for p in paths), tuple(paths),
                                 *_verdict(folder, names)))
    return models


def _model_name(file_name: str) -> str:
    """`mmproj-Pixtral-12B-2409-F16.gguf` and `Pixtral-12B-2409-Q4_K_M.gguf` -> `Pixtral-12B-2409`."""
    prefix = split_name(file_name).prefix
    tag = quant_of(file_name)
    base = prefix[: -len(tag) - 1] if tag else prefix
    return base.removeprefix("mmproj-") if is_mmproj(file_name) else base


def _verdict(folder: Path, names: list[str]) -> tuple[str | None, str | None]:
    """(inspect_pair's first problem, or why there is no pair; the first correction made at load) for the
    pair a run would take."""
    try:
        text = choose_text_file(names, where=str(folder)).name
        mmproj = choose_mmproj_file(names, text, where=str(folder)).name
        info = inspect_pair(ModelFiles(folder / text, folder / mmproj))
    except ModelError as exc:
        return str(exc), None
    corrected = info.quirks.corrected if info.quirks is not None else ()
    return (info.problems[0] if info.problems else None), (corrected[0].what if corrected else None)


def _cached(cache_dir: Path | None) -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from pixtral_cpp.hub_models import hub_cache_dir

    try:
        info = scan_cache_dir(cache_dir or hub_cache_dir())
    except CacheNotFound:
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = next((r for r in repo.revisions if "main" in r.refs), max(repo.revisions,
                                                                              key=lambda r: r.last_modified))
        names = [f.file_path.relative_to(revision.snapshot_path).as_posix() for f in revision.files]
        if not text_quants(names) or not any(is_mmproj(n) for n in names):
            continue  # not a GGUF pair repo (a checkpoint `convert` fetched, say)
        problem, correction = _verdict(revision.snapshot_path, names)
        if "pixtral" not in repo.repo_id.lower() and problem and "not a Pixtral" in problem:
            continue  # another model's GGUFs
        models.append(LocalModel(repo.repo_id, HUB_CACHE, repo.repo_id, Path(repo.repo_path),
                                 tuple(text_quants(names)), repo.size_on_disk, (), problem,
                                 tuple(r.commit_hash for r in repo.revisions), correction))
    return models


@dataclass(frozen=True)
class Removal:
    model: LocalModel
    freed_bytes: int


def find_local_model(name: str, models: list[LocalModel]) -> LocalModel:
    found = [m for m in models if m.name == name or m.name.lower() == name.lower()]
    if not found:
        listed = ", ".join(m.name for m in models) or "none"
        raise ModelError(f"no local model named {name!r}; `pixtral-cpp models` lists them ({listed})")
    return found[0]


def remove_local_model(model: LocalModel, cache_dir: Path | None = None) -> Removal:
    """Delete a converted model's files, or every cached revision of a repo (huggingface_hub's delete strategy)."""
    if model.kind == CONVERTED:
        for path in model.paths:
            path.unlink(missing_ok=True)
        return Removal(model, model.size_bytes)
    from huggingface_hub import scan_cache_dir

    from pixtral_cpp.hub_models import hub_cache_dir

    strategy = scan_cache_dir(cache_dir or hub_cache_dir()).delete_revisions(*model.revisions)
    strategy.execute()
    return Removal(model, strategy.expected_freed_size)
