"""Which files of a GGUF repo or folder make the pair: llama.cpp's `-hf` rules, as pure functions over names.

The rules, read in common/download.cpp of the pinned llama.cpp (find_best_model, get_gguf_split_info,
find_best_sibling), so that `user/repo:QUANT` means the same files here and in `llama-cli -hf`:

- The text model is the first `.gguf` whose path matches `<TAG>[.-]`, case-insensitively, trying the tag asked
  for, else Q4_K_M and then Q8_0. Names containing `mmproj` or `imatrix` are not text models; of a split model
  (`...-00001-of-00003.gguf`) only the first shard is. With no tag asked for and neither default present,
  llama.cpp takes the first text model file; with a tag asked for that no file has, it refuses and lists the
  GGUF files. Both the same here.
- The mmproj is a `.gguf` with `mmproj` in its name, in the text model's folder or one above it (the nearest
  wins). Where several are offered, llama.cpp takes the one whose bit count is closest to the text model's (a
  Q8_0 projector beside a Q4_K_M model); pixtral-cpp prefers precision instead (F16, then BF16, F32, Q8_0:
  the projector is small and its rounding reaches every image token) and says which it took.

Two deliberate differences: names are listed in sorted order (llama.cpp keeps the hub's order, sorted too, or
the cache folder's, which is arbitrary), and `mmproj`/`imatrix` are recognised in any case (llama.cpp matches
them case-sensitively, so it would take an `MMPROJ-...` file for a text model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from pixtral_cpp.defaults import DEFAULT_TEXT_QUANTS, MMPROJ_PREFERENCE
from pixtral_cpp.errors import ModelError

_SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})$", re.IGNORECASE)  # llama.cpp's re_split
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)  # llama.cpp's re_tag: the name's last word
_NOT_TEXT = ("mmproj", "imatrix")


@dataclass(frozen=True)
class Choice:
    """The file taken (a path relative to the repo or folder, `/`-separated), and a note when there was a choice."""

    name: str
    note: str | None = None


@dataclass(frozen=True)
class SplitName:
    """What a GGUF file name says: its stem without the shard suffix, its quantization tag, which shard of how many."""

    prefix: str
    tag: str
    index: int = 1
    count: int = 1


def split_name(name: str) -> SplitName:
    """`dir/model-Q8_0-00001-of-00002.gguf` -> prefix `dir/model-Q8_0`, tag `Q8_0`, shard 1 of 2."""
    prefix = name.removesuffix(".gguf") if name.lower().endswith(".gguf") else name
    index = count = 1
    shard = _SPLIT.match(prefix)
    if shard:
        prefix, index, count = shard.group(1), int(shard.group(2)), int(shard.group(3))
    tag = _TAG.search(prefix)
    return SplitName(prefix, tag.group(1).upper() if tag else "", index, count)


def is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def is_mmproj(name: str) -> bool:
    return is_gguf(name) and "mmproj" in PurePosixPath(name).name.lower()


def is_text_model(name: str) -> bool:
    """A GGUF that is neither a projector nor an importance matrix, and the first shard if it is split."""
    base = PurePosixPath(name).name.lower()
    return is_gguf(name) and not any(word in base for word in _NOT_TEXT) and split_name(name).index == 1


def quant_of(name: str) -> str:
    """The quantization a file name states (`F16`, `Q4_K_M`), upper-case; '' when it states none."""
    return split_name(name).tag


def text_quants(names: Iterable[str]) -> list[str]:
    """The quantizations of the text models offered, in name order, each once."""
    return list(dict.fromkeys(quant_of(n) for n in sorted(names) if is_text_model(n) and quant_of(n)))


def shards_of(names: Iterable[str], text_name: str) -> list[str]:
    """Every file of a split text model (just the file itself when it is not split), in shard order."""
    first = split_name(text_name)
    if first.count == 1:
        return [text_name]
    shards = [n for n in names if (s := split_name(n)).count == first.count and s.prefix == first.prefix]
    return sorted(shards, key=lambda n: split_name(n).index)


def choose_text_file(names: Iterable[str], quant: str | None = None, *, where: str = "the list") -> Choice:
    """The text model by llama.cpp's rule: the tag asked for, else Q4_K_M, then Q8_0, then the first one."""
    names = sorted(names)
    models = [n for n in names if is_text_model(n)]
    for tag in (quant,) if quant else DEFAULT_TEXT_QUANTS:
        pattern = re.compile(re.escape(tag) + "[.-]", re.IGNORECASE)
        found = next((n for n in models if pattern.search(n)), None)
        if found:
            return Choice(found, None if quant else _default_note(found, tag, models))
    if models and not quant:
        return Choice(models[0], _default_note(models[0], None, models))
    if quant:
        raise ModelError(f"no {quant} text model in {where}; {_holds(names)}")
    raise ModelError(f"no text model (*.gguf) in {where}; {_holds(names)}")


def _default_note(taken: str, tag: str | None, models: list[str]) -> str | None:
    """Said only when the folder offered a choice; names the way to choose."""
    others = [q for q in text_quants(models) if q != quant_of(taken)]
    if not others:
        return None
    why = f"the default {tag}" if tag else f"none is {' or '.join(DEFAULT_TEXT_QUANTS)}, so the first"
    return (f"text model: took {taken} ({why}); also offered: {', '.join(others)}; "
            f"add :QUANT to the model to choose")


def choose_mmproj_file(names: Iterable[str], text_name: str, quant: str | None = None, *,
                       where: str = "the list") -> Choice:
    """The projector for `text_name`: nearest folder, then `quant` if asked, then F16, BF16, F32, Q8_0."""
    names = sorted(names)
    nearest = _nearest_projectors(names, text_name)
    if not nearest:
        raise ModelError(f"no mmproj (mmproj-*.gguf) beside {text_name} in {where}: no .gguf there has "
                         f"'mmproj' in its name ({_holds(names)}); pass --mmproj PATH")
    if quant:
        asked = [n for n in nearest if quant_of(n) == quant.upper()]
        if not asked:
            offered = ", ".join(quant_of(n) or n for n in nearest)
            raise ModelError(f"no {quant} mmproj beside {text_name} in {where}; offered: {offered}")
        nearest = asked
    if len(nearest) == 1:
        return Choice(nearest[0])
    model = split_name(PurePosixPath(text_name).name).prefix.lower()
    model = model[: -len(quant_of(text_name))].rstrip("-.") if quant_of(text_name) else model
    taken = min(nearest, key=lambda n: (model not in n.lower(), _precision_rank(n)))
    return Choice(taken, f"mmproj: took {PurePosixPath(taken).name} ({quant_of(taken) or 'no type in its name'}) "
                         f"of {', '.join(PurePosixPath(n).name for n in nearest)}; --mmproj-quant chooses")


def _nearest_projectors(names: list[str], text_name: str) -> list[str]:
    """The mmproj files in the deepest folder that contains the text model (llama.cpp's find_best_sibling)."""
    text_dir = PurePosixPath(text_name).parent.parts
    by_depth: dict[int, list[str]] = {}
    for name in names:
        folder = PurePosixPath(name).parent.parts
        if is_mmproj(name) and text_dir[: len(folder)] == folder:
            by_depth.setdefault(len(folder), []).append(name)
    return by_depth[max(by_depth)] if by_depth else []


def _precision_rank(name: str) -> int:
    """Prefer the most precise projector when several quantizations sit side by side."""
    tag = quant_of(name)
    return MMPROJ_PREFERENCE.index(tag) if tag in MMPROJ_PREFERENCE else len(MMPROJ_PREFERENCE)


def _holds(names: list[str]) -> str:
    ggufs = [n for n in names if is_gguf(n)]
    return f"it holds {', '.join(ggufs)}" if ggufs else "it holds no .gguf file"
