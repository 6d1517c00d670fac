"""What llama.cpp's own converter writes for Pixtral, next to pixtral-cpp's conversion of the same checkpoint.

Not part of the test suite: it needs the llama-cpp-python sdist's convert_hf_to_gguf.py, its gguf-py and
sentencepiece (kept out of the project venv, e.g. `pip install --target /work/convdeps sentencepiece`).
Findings: docs/others-ggufs.md.

    python benchmarks/llama_converter_diff.py --llama-cpp /work/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \
        --extra-path /work/convdeps --work /tmp/llama-diff
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pixtral_cpp.convert import ConvertOptions, convert_checkpoint
from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header
from pixtral_cpp.model_files import ModelFiles
from pixtral_cpp.synthetic import write_synthetic_checkpoint

SEED = 1234
_LONG = 60  # longer values are summarised


def run_llama_converter(llama_cpp: Path, extra_path: str, source: Path, out: Path, *flags: str) -> str:
    """Run convert_hf_to_gguf.py; the last lines of its log (the error, if it failed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(llama_cpp / "gguf-py"), extra_path) if p))
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(source), "--outfile", str(out),
           "--outtype", "f32", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print("$", " ".join(cmd[1:]), "->", "ok" if done.returncode == 0 else f"exit {done.returncode}")
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def show(value: object) -> str:
    if isinstance(value, list):
        head = ", ".join(f"{v:.6g}" if isinstance(v, float) else repr(v) for v in value[:3])
        return f"[{head}{', ...' if len(value) > 3 else ''}] ({len(value)} items)"
    text = f"{value:.7g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= _LONG else f"{text[:_LONG]}... ({len(text)} chars)"


def compare(label: str, ours: GGUFHeader | None, theirs: GGUFHeader | None) -> None:
    print(f"\n## {label}: pixtral-cpp {ours.path.name if ours else '-'} vs llama.cpp "
          f"{theirs.path.name if theirs else '-'}")
    if ours is None or theirs is None:
        return
    for key in sorted(set(ours.metadata) | set(theirs.metadata)):
        a, b = ours.metadata.get(key, "<absent>"), theirs.metadata.get(key, "<absent>")
        if key.endswith(("tokens", "scores", "token_type", "merges")) and a != "<absent>" and b != "<absent>":
            same = a == b
            print(f"  {key}: {'same' if same else 'DIFFERENT'} ({len(a)} / {len(b)} items)")
            continue
        if a != b:
            print(f"  {key}: {show(a)}  |  {show(b)}")
    for name in sorted(set(ours.tensors) | set(theirs.tensors)):
        a, b = ours.tensors.get(name), theirs.tensors.get(name)
        fa = f"{a.type.name}{list(a.ne)}" if a else "<absent>"
        fb = f"{b.type.name}{list(b.ne)}" if b else "<absent>"
        if fa != fb:
            print(f"  tensor {name}: {fa}  |  {fb}")
    shared = [n for n in ours.tensors if n in theirs.tensors
              and ours.tensors[n].type == theirs.tensors[n].type and ours.tensors[n].ne == theirs.tensors[n].ne]
    differing = [n for n in shared if bytes(ours.tensor_data(n)) != bytes(theirs.tensor_data(n))]
    print(f"  {len(shared)} tensors of the same name, type and shape; data differs in {len(differing)}: "
          f"{differing[:6]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="the sdist's vendor/llama.cpp")
    parser.add_argument("--extra-path", default="", help="where sentencepiece is installed (PYTHONPATH)")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    args = parser.parse_args()
    work = args.work
    hf = write_synthetic_checkpoint(work / "hf", layout="hf", shape="tiny", seed=SEED)
    # llama.cpp's LlavaVisionModel opens tokenizer_config.json (the real repos ship one), then falls back
    # to tokenizer.json's added_tokens for [IMG_BREAK]'s id.
    (hf / "tokenizer_config.json").write_text("{}")
    native = write_synthetic_checkpoint(work / "native", layout="native", shape="tiny", seed=SEED)
    theirs = work / "llama"
    theirs.mkdir(parents=True, exist_ok=True)
    outputs = {
        "hf-text": (hf, ()), "hf-mmproj": (hf, ("--mmproj",)),
        "native-text": (native, ("--mistral-format",)), "native-mmproj": (native, ("--mistral-format", "--mmproj")),
    }
    files: dict[str, Path | None] = {}
    for name, (source, flags) in outputs.items():
        path = theirs / f"{name}.gguf"
        tail = run_llama_converter(args.llama_cpp, args.extra_path, source, path, *flags)
        files[name] = path if path.is_file() else None
        if files[name] is None:
            print("   ", tail.replace("\n", "\n    "))
    ours = {}
    for name, source in (("hf", hf), ("native", native)):
        result = convert_checkpoint(ConvertOptions(source=source, output_dir=work / f"ours-{name}", quant="F32",
                                                   mmproj_quant="F32", force=True))
        ours[name] = (read_gguf_header(result.text_path), read_gguf_header(result.mmproj_path))
    for name in ("hf", "native"):
        text, mmproj = files[f"{name}-text"], files[f"{name}-mmproj"]
        compare(f"{name} text", ours[name][0], read_gguf_header(text) if text else None)
        compare(f"{name} mmproj", ours[name][1], read_gguf_header(mmproj) if mmproj else None)
    print("\nfiles:", json.dumps({k: str(v) for k, v in files.items()}, indent=1))
    if files["hf-text"] and files["hf-mmproj"]:
        run_both(ModelFiles(files["hf-text"], files["hf-mmproj"]), ours["hf"], work)


def run_both(theirs: ModelFiles, ours: tuple[GGUFHeader, GGUFHeader], work: Path) -> None:
    """pixtral-cpp on both pairs (llama.cpp's corrected at load): the image prompt's logits."""
    import numpy as np

    from pixtral_cpp.conversation import Image, Message, Text
    from pixtral_cpp.model import PixtralModel
    from pixtral_cpp.options import ModelOptions

    os.environ.setdefault("PIXTRAL_CPP_CORRECTED_DIR", str(work / "cache"))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    messages = [Message("user", (Image(image), Text("What is in this picture?")))]
    options = ModelOptions(n_ctx=4096, kv_cache_type="f32", flash_attn="off")
    logits = []
    for text_path, mmproj_path in ((ours[0].path, ours[1].path), (theirs.text, theirs.mmproj)):
        with PixtralModel.load(text_path, mmproj_path, options) as model:
            logits.append(model.prompt_logits(messages))
            print(f"{text_path.name}: {model.info.quirks.verdict[:70]}...")
    print(f"image prompt logits, llama.cpp's pair (corrected at load) vs pixtral-cpp's: max |diff| = "
          f"{float(np.abs(logits[0] - logits[1]).max()):.3g}, same argmax: {logits[0].argmax() == logits[1].argmax()}")


if __name__ == "__main__":
    main()
