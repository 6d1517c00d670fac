"""convert_checkpoint: a Pixtral checkpoint -> text GGUF + mmproj GGUF, validated, streamed, atomic."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from pixtral_cpp.convert.metadata import add_mmproj_metadata, add_text_metadata
from pixtral_cpp.convert.output import (
    METADATA_ALLOWANCE,
    check_free_space,
    partial_path,
    prepare_output_dir,
    publish_together,
    refuse_existing,
    temporary_files,
)
from pixtral_cpp.convert.plan import PlannedTensor, check_coverage, file_bytes, plan_file
from pixtral_cpp.convert.progress import NullProgress, Progress
from pixtral_cpp.convert.quant_types import QuantType, mmproj_quant, text_quant
from pixtral_cpp.convert.source import (
    Checkpoint,
    fetch_from_hub,
    hub_url,
    looks_like_repo_id,
    open_checkpoint,
)
from pixtral_cpp.convert.tensor_map import Target
from pixtral_cpp.convert.writer import write_gguf
from pixtral_cpp.errors import CheckpointError
from pixtral_cpp.formatting import format_bytes
from pixtral_cpp.gguf_keys import MMPROJ_ARCH, TEXT_ARCH
from pixtral_cpp.paths import default_models_dir

if TYPE_CHECKING:
    from pixtral_cpp.backend.row_quantizer import RowQuantizer


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert, to where, at which precision."""

    source: str | Path
    output_dir: Path | None = None  # default: the models folder the runtime looks in
    quant: str = "Q4_K_M"
    mmproj_quant: str = "F16"
    force: bool = False
    threads: int | None = None  # quantizer threads; default: all cores
    context_length: int | None = None  # override the GGUF's training context
    revision: str | None = None  # hub revision


@dataclass(frozen=True)
class ConversionPlan:
    """Everything conversion will do, known before a byte is written (what --dry-run prints)."""

    source_folder: Path
    layout: str
    text_path: Path
    mmproj_path: Path
    text_quant: QuantType
    mmproj_quant: QuantType
    text_tensors: int
    mmproj_tensors: int
    text_bytes: int
    mmproj_bytes: int

    @property
    def disk_needed(self) -> int:
        return self.text_bytes + self.mmproj_bytes + 2 * METADATA_ALLOWANCE

    def describe(self) -> str:
        lines = [
            f"source       {self.source_folder} ({self.layout} layout)",
            f"text model   {self.text_path}  {self.text_quant.name}, {self.text_tensors} tensors, "
            f"{format_bytes(self.text_bytes)}",
            f"mmproj       {self.mmproj_path}  {self.mmproj_quant.name}, {self.mmproj_tensors} tensors, "
            f"{format_bytes(self.mmproj_bytes)}",
        ]
        lines.append(f"disk needed  {format_bytes(self.disk_needed)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ConvertResult:
    text_path: Path
    mmproj_path: Path
    plan: ConversionPlan
    seconds: float


def resolve_source(options: ConvertOptions) -> tuple[Path, str | None]:
    """A local folder for the source, and its hub URL when it came from the hub."""
    source = str(options.source)
    if Path(source).expanduser().exists():
        return Path(source).expanduser(), None
    if looks_like_repo_id(source):
        return fetch_from_hub(source, revision=options.revision), hub_url(source)
    raise CheckpointError(f"{source}: no such folder, and not a hub repo id of the form 'org/name'")


def output_paths(checkpoint: Checkpoint, folder: Path, text: QuantType, mmproj: QuantType) -> tuple[Path, Path]:
    """`<Model>-<QUANT>.gguf` and `mmproj-<Model>-<QUANT>.gguf`: model, kind and precision at a glance."""
    base = re.sub(r"[^\w.-]+", "-", checkpoint.info.name).strip("-") or "pixtral"
    return folder / f"{base}-{text.name}.gguf", folder / f"mmproj-{base}-{mmproj.name}.gguf"


def _plans(checkpoint: Checkpoint, text: QuantType, mmproj: QuantType
           ) -> tuple[list[PlannedTensor], list[PlannedTensor]]:
    text_plan = plan_file(checkpoint, Target.TEXT, text.mix)
    mmproj_plan = plan_file(checkpoint, Target.MMPROJ, mmproj.mix)
    check_coverage(checkpoint, text_plan, mmproj_plan)
    return text_plan, mmproj_plan


def _make_plan(checkpoint: Checkpoint, options: ConvertOptions, text_plan: list[PlannedTensor],
               mmproj_plan: list[PlannedTensor], text: QuantType, mmproj: QuantType) -> ConversionPlan:
    out_dir = Path(options.output_dir) if options.output_dir else default_models_dir()
    text_path, mmproj_path = output_paths(checkpoint, out_dir, text, mmproj)
    return ConversionPlan(
        source_folder=checkpoint.folder, layout=checkpoint.layout, text_path=text_path,
        mmproj_path=mmproj_path, text_quant=text, mmproj_quant=mmproj,
        text_tensors=len(text_plan), mmproj_tensors=len(mmproj_plan),
        text_bytes=file_bytes(text_plan), mmproj_bytes=file_bytes(mmproj_plan),
    )


def plan_conversion(options: ConvertOptions) -> ConversionPlan:
    """Validate the source and describe the conversion without writing anything."""
    text, mmproj = text_quant(options.quant), mmproj_quant(options.mmproj_quant)
    folder, url = resolve_source(options)
    with open_checkpoint(folder, context_length=options.context_length, source_url=url) as checkpoint:
        text_plan, mmproj_plan = _plans(checkpoint, text, mmproj)
        return _make_plan(checkpoint, options, text_plan, mmproj_plan, text, mmproj)


def convert_checkpoint(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert a Pixtral checkpoint into a text GGUF and an mmproj GGUF; returns where they are."""
    progress = progress or NullProgress()
    started = time.monotonic()
    text, mmproj = text_quant(options.quant), mmproj_quant(options.mmproj_quant)
    folder, url = resolve_source(options)
    with open_checkpoint(folder, context_length=options.context_length, source_url=url) as checkpoint:
        text_plan, mmproj_plan = _plans(checkpoint, text, mmproj)
        plan = _make_plan(checkpoint, options, text_plan, mmproj_plan, text, mmproj)
        prepare_output_dir(plan.text_path.parent)
        refuse_existing([plan.text_path, plan.mmproj_path], options.force)
        check_free_space(plan.text_path.parent, plan.disk_needed)
        # The pair is published together: the finished mmproj waits under its partial name until the
        # text model is in place, so a failed run never leaves a new mmproj beside an old text model.
        mmproj_partial, text_partial = partial_path(plan.mmproj_path), partial_path(plan.text_path)
        with temporary_files(mmproj_partial, text_partial), _quantizer(plan, options.threads) as quantizer:
            _write_file(MMPROJ_ARCH, plan.mmproj_quant, mmproj_partial, checkpoint, mmproj_plan, "mmproj",
                        quantizer, progress)
            _write_file(TEXT_ARCH, plan.text_quant, text_partial, checkpoint, text_plan, "text model",
                        quantizer, progress)
            publish_together((text_partial, plan.text_path), (mmproj_partial, plan.mmproj_path))
    return ConvertResult(plan.text_path, plan.mmproj_path, plan, time.monotonic() - started)


@contextmanager
def _quantizer(plan: ConversionPlan, threads: int | None) -> Iterator[RowQuantizer | None]:
    """ggml's row quantizers, loaded only when a quantized type was asked for."""
    if not (plan.text_quant.mix.quantized or plan.mmproj_quant.mix.quantized):
        yield None
        return
    from pixtral_cpp.backend.row_quantizer import RowQuantizer

    with RowQuantizer(threads or os.cpu_count() or 1) as quantizer:
        yield quantizer


def _write_file(arch: str, quant: QuantType, path: Path, checkpoint: Checkpoint, tensors: list[PlannedTensor],
                label: str, quantizer: RowQuantizer | None, progress: Progress) -> None:
    writer = gguf.GGUFWriter(None, arch)
    if arch == TEXT_ARCH:
        add_text_metadata(writer, checkpoint.config, checkpoint.vocab, checkpoint.info, quant.ftype)
    else:
        add_mmproj_metadata(writer, checkpoint.config, checkpoint.info, quant.ftype)
    progress.begin(f"{label} ({quant.name})", file_bytes(tensors))
    write_gguf(writer, str(path), checkpoint, tensors, quantizer, progress.advance)
    progress.end()
