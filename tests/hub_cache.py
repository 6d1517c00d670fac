"""A local Hugging Face cache laid out as huggingface_hub writes it, holding repos named and shaped like the
published Pixtral GGUF repos, with tiny real GGUFs under the published names (so check_pair really runs).

Layout (HF_HUB_CACHE): models--user--repo/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/main holding the commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

GGML = "ggml-org/pixtral-12b-GGUF"
BARTOWSKI = "bartowski/mistral-community_pixtral-12b-GGUF"
COMMITS = {GGML: "1" * 40, BARTOWSKI: "2" * 40}
BARTOWSKI_PREFIX = "mistral-community_pixtral-12b"


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_repo(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str | None = None,
             revision: str = "main") -> Path:
    """One revision of a repo: each file a blob named by its sha256 (hard-linked from a Path), linked from the
    snapshot as huggingface_hub links it; returns the snapshot folder."""
    commit = commit or COMMITS.get(repo_id, "0" * 40)
    folder = repo_dir(cache, repo_id)
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = folder / "snapshots" / commit
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            if isinstance(content, Path):
                os.link(content, blob)
            else:
                blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


@dataclasses.dataclass(frozen=True)
class TinyFiles:
    """The tiny model's files the repos are made of."""

    text: Path  # F16 text model, under every text name
    text_q8: Path  # a real Q8_0 conversion, under the Q8_0 names
    mmproj: Path  # F16 mmproj


def ggml_files(tiny: TinyFiles) -> dict[str, Path | bytes]:
    """As ggml-org/pixtral-12b-GGUF: three quantizations and one F16 projector (lower-case f16)."""
    return {"pixtral-12b-Q4_K_M.gguf": tiny.text, "pixtral-12b-Q8_0.gguf": tiny.text_q8,
            "pixtral-12b-f16.gguf": tiny.text, "mmproj-pixtral-12b-f16.gguf": tiny.mmproj,
            "README.md": b"---\nlicense: apache-2.0\n---\n"}


def bartowski_files(tiny: TinyFiles) -> dict[str, Path | bytes]:
    """As bartowski's repo: several quantizations, an F16 projector, a split file and an importance matrix
    (named so it sorts before the Q4_K_M model: only the skip rule keeps it from being taken)."""
    p = BARTOWSKI_PREFIX
    return {f"{p}-Q4_K_M.gguf": tiny.text, f"{p}-Q5_K_M.gguf": tiny.text, f"{p}-Q8_0.gguf": tiny.text_q8,
            f"mmproj-{p}-f16.gguf": tiny.mmproj, f"{p}-Q4_K_M-imatrix.gguf": b"not a model",
            f"{p}-f32-00001-of-00002.gguf": b"shard one", f"{p}-f32-00002-of-00002.gguf": b"shard two"}


def build_hub_cache(cache: Path, tiny: TinyFiles) -> Path:
    add_repo(cache, GGML, ggml_files(tiny))
    add_repo(cache, BARTOWSKI, bartowski_files(tiny))
    return cache


def interrupt_download(cache: Path, repo_id: str, name: str, partial: bytes) -> Path:
    """What a killed download leaves: a process-unique `.incomplete` blob, no snapshot link (huggingface_hub
    links a file only after the blob is complete)."""
    folder = repo_dir(cache, repo_id)
    link = folder / "snapshots" / COMMITS[repo_id] / name
    blob = link.resolve()
    link.unlink()
    blob.unlink()
    left = folder / "blobs" / f"{blob.name}.0a1b2c3d.incomplete"
    left.write_bytes(partial)
    return left


def other_width_mmproj(work: Path) -> Path:
    """An mmproj converted from a Pixtral whose text width is 512, not the tiny model's 256."""
    from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
    from pixtral_cpp.synthetic import SHAPES, TextShape, write_synthetic_checkpoint

    shape = dataclasses.replace(SHAPES["tiny"], text=TextShape(hidden=512, layers=1, heads=8, kv_heads=2,
                                                                head_dim=64, ffn=512))
    source = write_synthetic_checkpoint(work / "Other", layout="native", shape=shape, tokenizer="small")
    return convert_checkpoint(ConvertOptions(source=source, output_dir=work / "out", quant="F16")).mmproj_path
