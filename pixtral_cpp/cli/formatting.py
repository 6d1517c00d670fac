"""Human-readable text for the CLI (formatting only; the facts come from the library)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pixtral_cpp.formatting import format_bytes

if TYPE_CHECKING:
    from pixtral_cpp.model_files import PairInfo


def format_pair_info(pair: PairInfo) -> str:
    """The pair as aligned lines: each file's type, size and shape, then whether the two match."""
    t, v = pair.text, pair.vision
    types = ", ".join(f"{name} x{count}" for name, count in sorted(t.tensor_types.items(), key=lambda kv: -kv[1]))
    lines = [
        f"text model   {t.path}",
        f"  name        {t.name or '-'}",
        f"  type        {t.file_type}  ({format_bytes(t.size_bytes)}; tensors: {types})",
        f"  shape       {t.block_count} layers, width {t.embedding_length}, {t.head_count} heads "
        f"({t.head_count_kv} KV) of {t.head_dim}, FFN {t.feed_forward_length}, vocabulary {t.vocab_size}",
        f"  context     {t.context_length} (training), RoPE base {t.rope_freq_base:g}",
        f"mmproj       {v.path}",
        f"  type        {v.file_type}  ({format_bytes(v.size_bytes)}), projector {v.projector_type}",
        f"  vision      {v.block_count} layers, width {v.embedding_length}, {v.head_count} heads, "
        f"patch {v.patch_size}, output width {v.output_embedding_length}",
        f"pair         {'matches' if pair.matches else 'DOES NOT MATCH'}",
    ]
    lines += [f"  - {problem}" for problem in pair.problems]
    return "\n".join(lines)
