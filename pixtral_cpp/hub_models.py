"""GGUF pairs from Hugging Face repos, `user/repo[@REVISION][:QUANT]`: listed, chosen by llama.cpp's `-hf` rules
(pixtral_cpp.model_select), downloaded into the standard Hugging Face cache and checked before they are used.

Online and offline share every step but the listing: the hub's metadata (names and sizes) when it answers,
else what the cache's snapshot of the revision holds (HF_HUB_OFFLINE=1, no network), as llama.cpp does. The
download is huggingface_hub's (`hf_hub_download`: the HF cache, HF_TOKEN, HF_ENDPOINT, revisions); it writes
each file to a temporary `.incomplete` blob, checks its size and only then renames it into place and links it
from the snapshot, so a half file never looks finished. huggingface_hub 2.x resumes a broken transfer within
the run (its retries continue from the byte reached) but deletes the partial blob when the run ends; a pull
interrupted by a kill leaves an `.incomplete` blob that nothing here takes for a file.

Environment read at each call (huggingface_hub reads its own at import): HF_HUB_CACHE, else HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub; HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pixtral_cpp.errors import ModelError, OutputError
from pixtral_cpp.formatting import format_bytes
from pixtral_cpp.model_files import ModelFiles, PairInfo, check_pair
from pixtral_cpp.model_select import choose_mmproj_file, choose_text_file, shards_of

log = logging.getLogger(__name__)

# owner/name as the hub allows them, an optional @revision (branch, tag or commit), an optional :QUANT
_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.\-/]+?))?"
                   r"(?::(?P<quant>[A-Za-z0-9_]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubSpec:
    """`user/repo[@REVISION][:QUANT]`: which repo, which revision (default main), which text quantization."""

    repo_id: str
    revision: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.quant}" if self.quant else "")


def parse_hub_spec(text: str) -> HubSpec | None:
    """The spec `text` spells, or None when it is not one (a path, say)."""
    found = _SPEC.match(text)
    if not found or found["repo"].endswith((".gguf", ".")) or ".." in found["repo"]:
        return None
    return HubSpec(found["repo"], found["revision"], found["quant"])


def looks_like_hub_spec(text: str) -> bool:
    """A hub spec that is not also a path on disk: an existing file or folder wins."""
    return parse_hub_spec(text) is not None and not Path(text).expanduser().exists()


# -- where huggingface_hub keeps things ---------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's own rule, read now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


# -- what a repo offers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    name: str  # path inside the repo, `/`-separated
    size: int | None  # bytes, from the hub's metadata or the cached file


@dataclass(frozen=True)
class RepoListing:
    """The files of one revision of a repo, from the hub or, offline, from the cache."""

    repo_id: str
    revision: str
    commit: str | None
    files: tuple[RepoFile, ...]
    from_cache: bool
    interrupted: tuple[Path, ...] = ()  # `.incomplete` blobs an interrupted download left (cache only)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]

    def file(self, name: str) -> RepoFile:
        return next(f for f in self.files if f.name == name)

    @property
    def where(self) -> str:
        return f"{self.repo_id}" + (" (local cache)" if self.from_cache else "")


def list_repo(spec: HubSpec, *, cache_dir: Path | None = None, offline: bool | None = None) -> RepoListing:
    """The hub's listing of the revision, else (offline, unreachable) the cache's; a ModelError if neither has it."""
    cache_dir = cache_dir or hub_cache_dir()
    revision = spec.revision or DEFAULT_REVISION
    if not (hub_offline() if offline is None else offline):
        listing = _list_online(spec.repo_id, revision)
        if listing is not None:
            return listing
    cached = list_cached_repo(spec.repo_id, revision, cache_dir)
    if cached is None:
        reason = "offline (HF_HUB_OFFLINE)" if (hub_offline() if offline is None else offline) else "hub unreachable"
        raise ModelError(f"{spec.repo_id}@{revision} is not in the local Hugging Face cache ({cache_dir}) and "
                         f"cannot be listed: {reason}")
    return cached


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a missing network raises: OSError (requests, OfflineModeIsEnabled) and httpx's transport errors."""
    try:
        import httpx2  # huggingface_hub 2.x

        return (OSError, httpx2.TransportError)
    except ImportError:
        return (OSError,)


def _list_online(repo_id: str, revision: str) -> RepoListing | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise ModelError(f"{repo_id} is gated: accept its terms on the hub, then log in with `hf auth login` or "
                         f"set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise ModelError(f"{repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no repo {repo_id} on the hub (or it is private: set HF_TOKEN)") from None
    except HfHubHTTPError as exc:
        log.warning("listing %s failed (%s); using the local cache", repo_id, exc)
        return None
    except _network_errors() as exc:
        log.info("hub unreachable (%s); using the local cache", exc)
        return None
    files = tuple(RepoFile(s.rfilename, s.size) for s in info.siblings or ())
    return RepoListing(repo_id, revision, info.sha, files, from_cache=False)


def list_cached_repo(repo_id: str, revision: str, cache_dir: Path) -> RepoListing | None:
    """What the cache's snapshot of `revision` holds: only files whose blob is complete (links that resolve)."""
    folder = repo_folder(cache_dir, repo_id)
    commit = cached_commit(folder, revision)
    if commit is None:
        return None
    snapshot = folder / "snapshots" / commit
    files = tuple(RepoFile(p.relative_to(snapshot).as_posix(), p.stat().st_size)
                  for p in sorted(snapshot.rglob("*")) if p.is_file())  # is_file follows links: dangling ones drop
    interrupted = tuple(sorted((folder / "blobs").glob("*.incomplete")))
    return RepoListing(repo_id, revision, commit, files, from_cache=True, interrupted=interrupted)


def cached_commit(folder: Path, revision: str) -> str | None:
    """The commit the cache has for `revision` (refs/<revision>, or the revision itself when it is a commit)."""
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision if _COMMIT.match(revision) else None
    return commit if commit and (folder / "snapshots" / commit).is_dir() else None


# -- which files, and whether they fit -----------------------------------------------------------------------


@dataclass(frozen=True)
class HubPlan:
    """The files a spec names: the text model (every shard of a split one), its mmproj, and what was chosen."""

    spec: HubSpec
    listing: RepoListing
    text: tuple[RepoFile, ...]
    mmproj: RepoFile
    notes: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[RepoFile, ...]:
        return (*self.text, self.mmproj)

    @property
    def size_bytes(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)  # type: ignore[arg-type]


def plan_pull(spec: HubSpec, listing: RepoListing, mmproj_quant: str | None = None) -> HubPlan:
    """The text model and mmproj files by llama.cpp's rules; an error names what the repo offers."""
    try:
        text = choose_text_file(listing.names, spec.quant, where=listing.where)
        mmproj = choose_mmproj_file(listing.names, text.name, mmproj_quant, where=listing.where)
    except ModelError as exc:
        raise ModelError(str(exc) + _interrupted_note(listing)) from None
    shards = tuple(listing.file(n) for n in shards_of(listing.names, text.name))
    notes = tuple(n for n in (text.note, mmproj.note) if n)
    return HubPlan(spec, listing, shards, listing.file(mmproj.name), notes)


def _interrupted_note(listing: RepoListing) -> str:
    if not listing.interrupted:
        return ""
    return (f" ({len(listing.interrupted)} interrupted download(s) in {listing.interrupted[0].parent} are not "
            f"used; pull again online to download them)")


def missing_bytes(plan: HubPlan, cache_dir: Path) -> int:
    """Bytes still to download: the plan's files the cache lacks at the listed commit (unknown sizes count 0)."""
    snapshot = repo_folder(cache_dir, plan.spec.repo_id) / "snapshots" / (plan.listing.commit or "")
    return sum(f.size or 0 for f in plan.files if not (plan.listing.commit and (snapshot / f.name).is_file()))


def check_disk_space(plan: HubPlan, cache_dir: Path) -> int:
    """Refuse before downloading what the cache's disk cannot hold; returns the bytes to download."""
    needed = missing_bytes(plan, cache_dir)
    if needed:
        free = shutil.disk_usage(_existing_parent(cache_dir)).free
        if free < needed:
            raise OutputError(f"pulling {plan.spec} needs {format_bytes(needed)} but {cache_dir} has "
                              f"{format_bytes(free)} free; free some space or set HF_HUB_CACHE to a larger disk")
    return needed


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# -- download ------------------------------------------------------------------------------------------------


class ByteProgress(Protocol):
    """What a download reports to (pixtral_cpp.cli.progress.TerminalProgress has this shape)."""

    def begin(self, label: str, total: int, unit: str = "bytes") -> None: ...

    def advance(self, amount: int) -> None: ...

    def end(self) -> None: ...


@dataclass(frozen=True)
class PulledModel:
    files: ModelFiles
    info: PairInfo
    plan: HubPlan
    downloaded_bytes: int = 0  # what this pull had to fetch (0: all of it was in the cache)

    @property
    def notes(self) -> tuple[str, ...]:
        return self.plan.notes


def pull(spec: HubSpec | str, *, mmproj_quant: str | None = None, cache_dir: Path | None = None,
         offline: bool | None = None, progress: ByteProgress | None = None) -> PulledModel:
    """List, choose, check the disk, download (or find in the cache) and check the pair (check_pair)."""
    spec = _as_spec(spec)
    cache_dir = cache_dir or hub_cache_dir()
    listing = list_repo(spec, cache_dir=cache_dir, offline=offline)
    plan = plan_pull(spec, listing, mmproj_quant)
    needed = check_disk_space(plan, cache_dir)
    paths = [download_file(plan, f, cache_dir=cache_dir, progress=progress) for f in plan.files]
    files = ModelFiles(paths[0], paths[-1])
    return PulledModel(files, check_pair(files), plan, needed)


def _as_spec(spec: HubSpec | str) -> HubSpec:
    if isinstance(spec, HubSpec):
        return spec
    parsed = parse_hub_spec(spec)
    if parsed is None:
        raise ModelError(f"{spec!r} is not a hub repo (expected user/repo[@REVISION][:QUANT])")
    return parsed


def download_file(plan: HubPlan, file: RepoFile, *, cache_dir: Path, progress: ByteProgress | None) -> Path:
    """One file through huggingface_hub (from the cache when there), its size checked against the listing."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    listing = plan.listing
    # offline, the snapshot listed; online, the revision (huggingface_hub then records refs/<revision>)
    revision = listing.commit if listing.from_cache else listing.revision
    try:
        path = Path(hf_hub_download(listing.repo_id, file.name, revision=revision, cache_dir=cache_dir,
                                    local_files_only=listing.from_cache,
                                    tqdm_class=_bar_class(progress, file.name) if progress else None))
    except LocalEntryNotFoundError:
        raise ModelError(f"{file.name} of {listing.repo_id} is not in the local cache and the hub cannot be "
                         f"reached" + _interrupted_note(listing)) from None
    except HfHubHTTPError as exc:
        raise ModelError(f"downloading {file.name} of {listing.repo_id} failed: {exc}") from None
    except _network_errors() as exc:
        raise ModelError(f"downloading {file.name} of {listing.repo_id} failed: {exc}; run the same command "
                         f"again to download it again") from None
    size = path.stat().st_size
    if file.size is not None and size != file.size:
        raise ModelError(f"{path} holds {size} bytes but the hub lists {file.size} for {file.name}: a damaged "
                         f"cache; remove it with `pixtral-cpp models rm {listing.repo_id}` and pull again")
    return path


def _bar_class(progress: ByteProgress, label: str) -> type:
    """A stand-in for huggingface_hub's tqdm that reports the bytes written to `progress`.

    huggingface_hub builds one per file (`tqdm_class(total=..., initial=..., desc=...)`) and uses it as a
    context manager; Xet downloads also call update_transfer with the network bytes, which are not the file's."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
            self.n, self.total, self.closed = initial, total, False
            progress.begin(label, total or 0)
            if initial:
                progress.advance(initial)

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            progress.advance(int(n or 0))

        def update_transfer(self, n: int) -> None:
            """Network bytes (Xet): not counted, the bar counts the file's bytes."""

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            """Speed is drawn by the progress itself."""

        set_transfer_postfix_str = set_postfix_str

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            """Nothing to redraw here."""

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                progress.end()

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, kind: object, *rest: object) -> None:
            if kind is None:
                self.close()
            self.closed = True

    return Bar
