"""convert_checkpoint: a Pixtral checkpoint -> text GGUF + mmproj GGUF, validated, streamed, atomic."""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as Q
from pixtral_cpp.convert.metadata import MMPROJ_ARCH, TEXT_ARCH, add_mmproj_metadata, add_text_metadata
from pixtral_cpp.convert.output import (
    METADATA_ALLOWANCE,
    check_free_space,
    format_bytes,
    partial_path,
    prepare_output_dir,
    publish,
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
from pixtral_cpp.paths import default_models_dir

# Intermediate type for llama.cpp's quantizer: lossless for the checkpoint's own precision.
_LOSSLESS_INTERMEDIATE = {"BF16": Q.BF16, "F16": Q.F16, "F32": Q.F32}


@dataclass(frozen=True)
class ConvertOptions:
    """What to convert, to where, at which precision."""

    source: str | Path
    output_dir: Path | None = None  # default: the models folder the runtime looks in
    quant: str = "Q4_K_M"
    mmproj_quant: str = "F16"
    force: bool = False
    threads: int | None = None  # llama.cpp quantizer threads; default: all cores
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
    text_bytes: int  # estimated for llama.cpp mixes
    mmproj_bytes: int
    intermediate_bytes: int  # the lossless file llama.cpp's quantizer reads; 0 when not needed

    @property
    def disk_needed(self) -> int:
        return self.text_bytes + self.mmproj_bytes + self.intermediate_bytes + 2 * METADATA_ALLOWANCE

    def describe(self) -> str:
        lines = [
            f"source       {self.source_folder} ({self.layout} layout)",
            f"text model   {self.text_path}  {self.text_quant.name}, {self.text_tensors} tensors, "
            f"{'~' if self.text_quant.needs_llama_quantizer else ''}{format_bytes(self.text_bytes)}",
            f"mmproj       {self.mmproj_path}  {self.mmproj_quant.name}, {self.mmproj_tensors} tensors, "
            f"{format_bytes(self.mmproj_bytes)}",
        ]
        if self.intermediate_bytes:
            lines.append(f"intermediate {format_bytes(self.intermediate_bytes)} (removed afterwards)")
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
           ) -> tuple[list[PlannedTensor], list[PlannedTensor], Q]:
    """Both files' tensor plans, and the type the text file is written in before any llama.cpp mix."""
    stage_type = _LOSSLESS_INTERMEDIATE[checkpoint.weight_dtype] if text.direct is None else text.direct
    assert mmproj.direct is not None
    text_plan = plan_file(checkpoint, Target.TEXT, stage_type)
    mmproj_plan = plan_file(checkpoint, Target.MMPROJ, mmproj.direct)
    check_coverage(checkpoint, text_plan, mmproj_plan)
    return text_plan, mmproj_plan, stage_type


def _make_plan(checkpoint: Checkpoint, options: ConvertOptions, text_plan: list[PlannedTensor],
               mmproj_plan: list[PlannedTensor], text: QuantType, mmproj: QuantType) -> ConversionPlan:
    out_dir = Path(options.output_dir) if options.output_dir else default_models_dir()
    text_path, mmproj_path = output_paths(checkpoint, out_dir, text, mmproj)
    staged = file_bytes(text_plan)
    n_params = sum(p.num_elements for p in text_plan)
    return ConversionPlan(
        source_folder=checkpoint.folder, layout=checkpoint.layout, text_path=text_path,
        mmproj_path=mmproj_path, text_quant=text, mmproj_quant=mmproj,
        text_tensors=len(text_plan), mmproj_tensors=len(mmproj_plan),
        text_bytes=int(n_params * text.bits_per_weight / 8) if text.needs_llama_quantizer else staged,
        mmproj_bytes=file_bytes(mmproj_plan),
        intermediate_bytes=staged if text.needs_llama_quantizer else 0,
    )


def plan_conversion(options: ConvertOptions) -> ConversionPlan:
    """Validate the source and describe the conversion without writing anything."""
    text, mmproj = text_quant(options.quant), mmproj_quant(options.mmproj_quant)
    folder, url = resolve_source(options)
    with open_checkpoint(folder, context_length=options.context_length, source_url=url) as checkpoint:
        text_plan, mmproj_plan, _ = _plans(checkpoint, text, mmproj)
        return _make_plan(checkpoint, options, text_plan, mmproj_plan, text, mmproj)


def convert_checkpoint(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert a Pixtral checkpoint into a text GGUF and an mmproj GGUF; returns where they are."""
    progress = progress or NullProgress()
    started = time.monotonic()
    text, mmproj = text_quant(options.quant), mmproj_quant(options.mmproj_quant)
    folder, url = resolve_source(options)
    with open_checkpoint(folder, context_length=options.context_length, source_url=url) as checkpoint:
        text_plan, mmproj_plan, stage_type = _plans(checkpoint, text, mmproj)
        plan = _make_plan(checkpoint, options, text_plan, mmproj_plan, text, mmproj)
        prepare_output_dir(plan.text_path.parent)
        refuse_existing([plan.text_path, plan.mmproj_path], options.force)
        check_free_space(plan.text_path.parent, plan.disk_needed)
        # The pair is published together: the finished mmproj waits under its partial name until the
        # text model is in place, so a failed run never leaves a new mmproj beside an old text model.
        mmproj_partial = partial_path(plan.mmproj_path)
        with temporary_files(mmproj_partial):
            _write_mmproj(checkpoint, mmproj_plan, plan, mmproj_partial, progress)
            _write_text(checkpoint, text_plan, plan, stage_type, options, progress)
            publish(mmproj_partial, plan.mmproj_path)
    return ConvertResult(plan.text_path, plan.mmproj_path, plan, time.monotonic() - started)


def _write_mmproj(checkpoint: Checkpoint, tensors: list[PlannedTensor], plan: ConversionPlan, path: Path,
                  progress: Progress) -> None:
    assert plan.mmproj_quant.direct is not None
    writer = gguf.GGUFWriter(None, MMPROJ_ARCH)
    add_mmproj_metadata(writer, checkpoint.config, checkpoint.info, plan.mmproj_quant.direct)
    _write_file(writer, path, checkpoint, tensors, "mmproj", progress)


def _write_file(writer: gguf.GGUFWriter, path: Path, checkpoint: Checkpoint, tensors: list[PlannedTensor],
                label: str, progress: Progress) -> None:
    progress.begin(label, file_bytes(tensors))
    write_gguf(writer, str(path), checkpoint, tensors, progress.advance)
    progress.end()


def _write_text(checkpoint: Checkpoint, tensors: list[PlannedTensor], plan: ConversionPlan, stage_type: Q,
                options: ConvertOptions, progress: Progress) -> None:
    writer = gguf.GGUFWriter(None, TEXT_ARCH)
    add_text_metadata(writer, checkpoint.config, checkpoint.vocab, checkpoint.info, stage_type)
    if not plan.text_quant.needs_llama_quantizer:
        partial = partial_path(plan.text_path)
        with temporary_files(partial):
            _write_file(writer, partial, checkpoint, tensors, "text model", progress)
            publish(partial, plan.text_path)
        return
    # llama.cpp's quantizer reads a GGUF: stage a lossless one beside the output, then quantize it.
    staged = partial_path(plan.text_path, f".{stage_type.name}-intermediate")
    quantized = partial_path(plan.text_path)
    with temporary_files(staged, quantized):
        _write_file(writer, staged, checkpoint, tensors, f"text model ({stage_type.name}, intermediate)", progress)
        _quantize_in_background(staged, quantized, plan.text_quant, options.threads, len(tensors), progress)
        publish(quantized, plan.text_path)


def _quantize_in_background(src: Path, dst: Path, quant: QuantType, threads: int | None, n_tensors: int,
                            progress: Progress) -> None:
    """Run llama.cpp's quantizer in a worker thread so Ctrl-C stays responsive in the main thread."""
    from pixtral_cpp.backend.quantize import LLAMA_FTYPES, quantize_gguf

    errors: list[BaseException] = []
    done = [0]

    def on_tensor(index: int, total: int, name: str) -> None:
        progress.advance(index - done[0])
        done[0] = index

    def work() -> None:
        try:
            quantize_gguf(src, dst, LLAMA_FTYPES[quant.name], threads=threads or os.cpu_count() or 1,
                          on_tensor=on_tensor)
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)

    progress.begin(f"text model ({quant.name}, llama.cpp quantizer)", n_tensors, unit="tensors")
    worker = threading.Thread(target=work, name="pixtral-cpp-quantize", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.2)
    progress.end()
    if errors:
        raise errors[0]
