"""Deterministic, streaming random Pixtral checkpoints in the Mistral-native and the HF layout.

Every tensor is drawn from RNG streams keyed by (seed, native tensor name, chunk index), so both layouts
carry the same model: the HF layout differs only in names and in the RoPE row order of the q/k weights.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pixtral_cpp.errors import ConfigError
from pixtral_cpp.synthetic import configs
from pixtral_cpp.synthetic.names import CheckpointTensor, HfPrefixes, Init, Rope, plan_tensors
from pixtral_cpp.synthetic.safetensors_writer import SafetensorsStreamWriter, TensorEntry
from pixtral_cpp.synthetic.shapes import SyntheticShape, resolve_shape
from pixtral_cpp.synthetic.tokenizer_files import TokenizerChoice, install_tokenizer

Layout = Literal["native", "hf"]
DType = Literal["bfloat16", "float32"]

# Values per RNG stream. Fixed, so the random values never depend on the output dtype or layout, and small,
# so that even the (131072, 5120) embedding is generated a few MB at a time.
CHUNK_ELEMENTS = 1 << 20
# A lookup table has no fan-in; unit scale puts text tokens in the residual stream at the magnitude the
# blocks add and the adapter outputs for image patches (both O(1) per element with 1/sqrt(fan_in) matrices).
EMBEDDING_STD = 1.0
NORM_LOW, NORM_HIGH = 0.6, 1.4  # RMSNorm gains visibly different from 1 so a dropped norm shows
BIAS_STD = 0.05

_WORKERS = min(4, os.cpu_count() or 1)
_LOOKAHEAD = 2 * _WORKERS  # blocks in flight: at most ~6 MB each

_SAFETENSORS_DTYPE: dict[str, str] = {"bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class _Options:
    layout: Layout
    seed: int
    dtype: DType
    hf_prefixes: HfPrefixes
    hf_shards: int
    sparse_config: bool


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of float32 values, rounded to nearest even like torch and gguf-py."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    result = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN payload into infinity; keep it a quiet NaN instead
        result[nan] = (bits[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040)
    return result


def rope_head_dim(tensor: CheckpointTensor, shape: SyntheticShape) -> int | None:
    """Head size of the RoPE row permutation this tensor gets in the HF layout (None: not permuted)."""
    if tensor.kind.rope in (Rope.TEXT_Q, Rope.TEXT_KV):
        return shape.text.head_dim
    if tensor.kind.rope is Rope.VISION:
        return shape.vision.head_dim
    return None


def _rows_per_chunk(tensor: CheckpointTensor, shape: SyntheticShape) -> int:
    # Chunks of q/k hold whole heads so that the HF permutation can be applied chunk by chunk.
    align = rope_head_dim(tensor, shape) or 1
    row_size = math.prod(tensor.shape[1:])
    return max(align, CHUNK_ELEMENTS // row_size // align * align)


def _rng(seed: int, name: str, chunk: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    entropy = [seed, zlib.crc32(name.encode()), chunk]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _draw(init: Init, rng: np.random.Generator, size: tuple[int, ...], fan_in: int) -> np.ndarray:
    if init is Init.NORM:
        values = rng.random(size, dtype=np.float32)
        values *= np.float32(NORM_HIGH - NORM_LOW)
        values += np.float32(NORM_LOW)
        return values
    scale = {Init.MATRIX: 1 / math.sqrt(fan_in), Init.CONV: 1 / math.sqrt(fan_in),
             Init.EMBEDDING: EMBEDDING_STD, Init.BIAS: BIAS_STD}[init]
    values = rng.standard_normal(size, dtype=np.float32)
    values *= np.float32(scale)
    return values


def _chunk_plan(tensor: CheckpointTensor, shape: SyntheticShape) -> list[tuple[int, int]]:
    """(chunk index, row count) of each row block; the index keys the block's RNG stream."""
    rows, step = tensor.shape[0], _rows_per_chunk(tensor, shape)
    return [(index, min(step, rows - start)) for index, start in enumerate(range(0, rows, step))]


def _native_chunk(tensor: CheckpointTensor, seed: int, index: int, count: int) -> np.ndarray:
    rest = tensor.shape[1:]
    fan_in = math.prod(rest)  # (out, in) matrices and (out, channels, patch, patch) convolutions
    return _draw(tensor.kind.init, _rng(seed, tensor.native, index), (count, *rest), fan_in)


def native_value_chunks(tensor: CheckpointTensor, shape: SyntheticShape, seed: int) -> Iterator[np.ndarray]:
    """The tensor's float32 values in the native layout, as consecutive row blocks."""
    for index, count in _chunk_plan(tensor, shape):
        yield _native_chunk(tensor, seed, index, count)


def permute_for_hf(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Native (interleaved pairs) -> HF (rotate_half) RoPE row order within each head.

    As transformers' convert_pixtral_weights_to_hf: view [heads, d/2, 2, C], swap axes 1 and 2, reshape.
    """
    columns = rows.shape[1:]
    heads = rows.reshape(-1, head_dim // 2, 2, *columns)
    return heads.swapaxes(1, 2).reshape(rows.shape)


def _encoded_chunk(tensor: CheckpointTensor, shape: SyntheticShape, options: _Options,
                   index: int, count: int) -> np.ndarray:
    values = _native_chunk(tensor, options.seed, index, count)
    # Round once, then shuffle rows: the HF file holds bit-identical values in another order.
    encoded = float32_to_bfloat16_bits(values) if options.dtype == "bfloat16" else values
    head_dim = rope_head_dim(tensor, shape) if options.layout == "hf" else None
    if head_dim is not None:
        encoded = permute_for_hf(encoded, head_dim)
    return encoded.astype(encoded.dtype.newbyteorder("<"), copy=False)


def _encoded_chunks(tensor: CheckpointTensor, shape: SyntheticShape, options: _Options,
                    pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    # numpy's RNG and ufuncs release the GIL: workers draw the next blocks while this thread writes.
    # The look-ahead bounds memory to a few blocks.
    pending: deque[Future[np.ndarray]] = deque()
    for index, count in _chunk_plan(tensor, shape):
        pending.append(pool.submit(_encoded_chunk, tensor, shape, options, index, count))
        if len(pending) > _LOOKAHEAD:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_safetensors(path: Path, tensors: list[CheckpointTensor], names: list[str],
                       shape: SyntheticShape, options: _Options) -> None:
    dtype = _SAFETENSORS_DTYPE[options.dtype]
    entries = [TensorEntry(name, dtype, tensor.shape) for name, tensor in zip(names, tensors, strict=True)]
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool, SafetensorsStreamWriter(path, entries) as writer:
        for name, tensor in zip(names, tensors, strict=True):
            writer.write_tensor(name, _encoded_chunks(tensor, shape, options, pool))


def tensor_nbytes(tensor: CheckpointTensor, dtype: DType) -> int:
    """Bytes the tensor occupies in a checkpoint of the given dtype."""
    return math.prod(tensor.shape) * (2 if dtype == "bfloat16" else 4)


def split_into_shards(tensors: list[CheckpointTensor], shards: int, dtype: DType) -> list[list[CheckpointTensor]]:
    """Consecutive groups of roughly equal byte size, none empty."""
    if not 1 <= shards <= len(tensors):
        raise ConfigError(f"hf_shards must be between 1 and {len(tensors)}, got {shards}")
    total = sum(tensor_nbytes(tensor, dtype) for tensor in tensors)
    groups: list[list[CheckpointTensor]] = [[] for _ in range(shards)]
    done, previous = 0, -1
    for position, tensor in enumerate(tensors):
        # The shard holding the tensor's middle byte, but never skipping a shard and always leaving
        # at least one tensor for each later shard.
        middle = done + tensor_nbytes(tensor, dtype) / 2
        shard = min(int(middle * shards / total), previous + 1)
        shard = max(shard, shards - (len(tensors) - position))
        groups[shard].append(tensor)
        done += tensor_nbytes(tensor, dtype)
        previous = shard
    return groups


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_native(out_dir: Path, shape: SyntheticShape, options: _Options) -> None:
    _write_json(out_dir / "params.json", configs.native_params(shape))
    tensors = plan_tensors(shape)
    names = [t.native for t in tensors]
    _write_safetensors(out_dir / "consolidated.safetensors", tensors, names, shape, options)


def _write_hf_weights(out_dir: Path, shape: SyntheticShape, options: _Options) -> None:
    tensors = plan_tensors(shape)
    if options.hf_shards == 1:
        names = [t.hf_name(options.hf_prefixes) for t in tensors]
        _write_safetensors(out_dir / "model.safetensors", tensors, names, shape, options)
        return
    weight_map: dict[str, str] = {}
    groups = split_into_shards(tensors, options.hf_shards, options.dtype)
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        names = [t.hf_name(options.hf_prefixes) for t in group]
        _write_safetensors(out_dir / file_name, group, names, shape, options)
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(tensor_nbytes(t, options.dtype) for t in tensors)
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_hf(out_dir: Path, shape: SyntheticShape, options: _Options) -> None:
    _write_json(out_dir / "config.json", configs.hf_config(shape, options.dtype, options.sparse_config))
    _write_json(out_dir / "preprocessor_config.json", configs.preprocessor_config(shape))
    _write_json(out_dir / "generation_config.json", configs.generation_config())
    _write_hf_weights(out_dir, shape, options)


def _check_options(options: _Options) -> None:
    if options.layout not in ("native", "hf"):
        raise ConfigError(f"layout must be 'native' or 'hf', got {options.layout!r}")
    if options.dtype not in _SAFETENSORS_DTYPE:
        raise ConfigError(f"dtype must be 'bfloat16' or 'float32', got {options.dtype!r}")
    if options.hf_prefixes not in ("legacy", "current"):
        raise ConfigError(f"hf_prefixes must be 'legacy' or 'current', got {options.hf_prefixes!r}")
    if options.hf_shards < 1:
        raise ConfigError(f"hf_shards must be at least 1, got {options.hf_shards}")
    if options.seed < 0:
        raise ConfigError(f"seed must be >= 0, got {options.seed}")


def write_synthetic_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    layout: Layout = "native",
    shape: str | SyntheticShape = "tiny",
    seed: int = 0,
    dtype: DType = "bfloat16",
    tokenizer: TokenizerChoice = "real",
    hf_prefixes: HfPrefixes = "legacy",
    hf_shards: int = 2,
    sparse_config: bool = True,
    hf_tokenizer_files: tuple[str, ...] = ("tokenizer.json",),
) -> Path:
    """Write a random Pixtral checkpoint into `out_dir` (created if needed) and return its path.

    native: params.json, consolidated.safetensors, tekken.json. hf: config.json (transformers 4.45 style),
    preprocessor_config.json, generation_config.json, sharded or single safetensors, and the tokenizer files
    named in `hf_tokenizer_files` ("tokenizer.json" and/or "tekken.json").
    """
    options = _Options(layout, seed, dtype, hf_prefixes, hf_shards, sparse_config)
    _check_options(options)
    resolved = resolve_shape(shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ("tekken.json",) if layout == "native" else hf_tokenizer_files
    vocab = install_tokenizer(out, tokenizer, files)
    sized = resolved.with_vocab(vocab)
    if layout == "native":
        _write_native(out, sized, options)
    else:
        _write_hf(out, sized, options)
    return out
