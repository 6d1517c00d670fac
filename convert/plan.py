"""Map a checkpoint onto the two GGUF files and validate it before a byte is written.

The plan is total and one-to-one: every source tensor is used or deliberately skipped, no two
sources feed one GGUF name, and every shape is what the config says.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as Q

from pixtral_cpp.convert import transforms as T
from pixtral_cpp.convert.config import PixtralConfig
from pixtral_cpp.convert.quant_mix import Mix, fit_row
from pixtral_cpp.convert.safetensors_reader import TensorInfo
from pixtral_cpp.convert.source import HF, Checkpoint
from pixtral_cpp.convert.tensor_map import SKIPPED_SUFFIXES, Storage, Target, TensorRow, rows_for
from pixtral_cpp.errors import TensorError


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: where it comes from, how it is transformed, what it becomes."""

    name: str
    source: TensorInfo
    shape: tuple[int, ...]  # torch order (out, in); GGUF stores it reversed
    out_type: Q
    transform: T.Transform = T.identity
    row: int | None = None  # take this row of the source instead of the whole tensor

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.out_type]
        return self.num_elements // block * size


def plan_file(checkpoint: Checkpoint, target: Target, mix: Mix) -> list[PlannedTensor]:
    """The tensors of one output file, in order, with types chosen per docs/gguf-layout.md §3.2 and,
    for the text model's matrices, by the llama.cpp mix."""
    planned, seen = [], set()
    for row, bid in rows_for(target, checkpoint.config):
        name = row.gguf.format(bid=bid)
        if name in seen:  # the table itself is wrong; fail loudly rather than write a broken file
            raise TensorError(f"internal error: two table rows produce GGUF tensor {name}")
        seen.add(name)
        planned.append(_plan_row(checkpoint, target, row, bid, name, mix))
    return planned


def _plan_row(checkpoint: Checkpoint, target: Target, row: TensorRow, bid: int | None, name: str, mix: Mix
              ) -> PlannedTensor:
    source_name = (row.hf if checkpoint.layout == HF else row.native).format(bid=bid)
    source = checkpoint.tensors.get(source_name)
    if source is None:
        raise TensorError(f"{checkpoint.folder}: tensor '{source_name}' (for GGUF {name}) is missing from "
                          f"the checkpoint's safetensors files")
    config = checkpoint.config
    if row.take_row_of is not None:
        index = checkpoint.vocab.id_of(row.take_row_of)
        expected_source = (config.text.vocab_size, config.text.hidden_size)
        _check_shape(source, expected_source, name)
        return PlannedTensor(name, source, row.shape(config), Q.F32, row=index)
    shape = row.shape(config)
    _check_shape(source, shape, name)
    transform = row.hf_transform if checkpoint.layout == HF else T.identity
    return PlannedTensor(name, source, shape, _output_type(target, row, name, bid, shape, mix, config), transform)


def _check_shape(source: TensorInfo, expected: tuple[int, ...], gguf_name: str) -> None:
    if source.shape != expected:
        raise TensorError(f"{source.file.name}: tensor '{source.name}' has shape {list(source.shape)}, "
                          f"expected {list(expected)} from the config (for GGUF {gguf_name})")


def _output_type(target: Target, row: TensorRow, name: str, bid: int | None, shape: tuple[int, ...], mix: Mix,
                 config: PixtralConfig) -> Q:
    if row.storage is Storage.F32 or len(shape) < 2:
        return Q.F32
    if row.storage is Storage.PATCH:
        return Q.F16 if mix.base == Q.F16 else Q.F32
    if target is Target.TEXT:
        text = config.text
        return mix.tensor_type(name, shape[-1], bid, text.num_layers, text.num_heads // text.num_kv_heads)
    # A row length the block does not divide cannot be quantized; llama.cpp's converter falls back the same way.
    return fit_row(mix.base, shape[-1])


def check_coverage(checkpoint: Checkpoint, *plans: list[PlannedTensor]) -> None:
    """Every source tensor must be used by some output, or be on the explicit skip list."""
    used = {p.source.name for plan in plans for p in plan}
    unknown = [
        info.name for info in checkpoint.tensors.values()
        if info.name not in used and not info.name.endswith(SKIPPED_SUFFIXES)
    ]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise TensorError(f"{checkpoint.folder}: unknown tensor(s) not in Pixtral's layout: {shown}. "
                          f"Is this a Pixtral-12B checkpoint?")


def file_bytes(plan: list[PlannedTensor]) -> int:
    return sum(p.nbytes for p in plan)
