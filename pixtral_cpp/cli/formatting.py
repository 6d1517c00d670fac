"""Human-readable text for the CLI (formatting only; the facts come from the library)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pixtral_cpp.formatting import format_bytes

if TYPE_CHECKING:
    from pixtral_cpp.model_files import PairInfo
    from pixtral_cpp.pair_quirks import PairQuirks


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
    if pair.quirks is not None:
        lines += format_quirks(pair.quirks)
    return "\n".join(lines)


def format_quirks(q: PairQuirks) -> list[str]:
    """Who wrote the pair, the facts that differ between converters, and pixtral-cpp's verdict."""
    from pixtral_cpp.pair_quirks import Handling

    def floats(values: tuple[float, ...]) -> str:
        return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"

    lines = [
        "written by",
        f"  text        {q.text_writer}",
        f"  mmproj      {q.mmproj_writer}",
        f"  general.type  text {q.text_type or '-'}, mmproj {q.mmproj_type or '-'}",
        f"  tokenizer   pre-tokenizer {q.pre_tokenizer or '-'}; chat template {q.chat_template}",
        f"  [IMG_BREAK] {'in the mmproj' if q.has_img_break else 'missing from the mmproj'}",
        f"  image norm  mean {floats(q.image_mean)}, std {floats(q.image_std)}: {q.normalization}",
        f"  context     {q.context_length if q.context_length is not None else 'missing'}",
        f"verdict      {q.verdict}",
    ]
    lines += [f"  - {quirk.what} [{quirk.handling.value}]" for quirk in q.quirks if quirk.handling is Handling.AS_IS]
    return lines
