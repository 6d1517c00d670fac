"""An offline self-test of the installation: build, convert and run a tiny random Pixtral end to end.

    report = run_doctor()
    if not report.ok:
        print(report.failed.name, report.failed.detail)

Every step is the real code path a user's model takes (the synthetic generator, the converter, the
llama.cpp quantizer, libmtmd, the prompt cache), on weights small enough to finish in seconds. The
first failing step stops the run; the work folder is removed unless the caller chose it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.conversation import Image, Message, Text
from pixtral_cpp.errors import PixtralError
from pixtral_cpp.images import pixtral_geometry
from pixtral_cpp.model import PixtralModel
from pixtral_cpp.model_files import ModelFiles
from pixtral_cpp.options import GenerationOptions, ModelOptions
from pixtral_cpp.results import Completion

IMAGE_SIZE = (208, 144)  # (width, height): 13 x 9 patches, not square, so rows and columns cannot swap
GREEDY = GenerationOptions(max_tokens=8, temperature=0)
MODEL_OPTIONS = ModelOptions(n_ctx=1024, disk_cache=False)  # its tiny model in a temp folder: nothing to keep
# Relative tolerance between prompt logits with a reused KV prefix and from a fresh model: the same
# weights and positions, only the batch split differs (F16 KV cache).
REUSE_TOLERANCE = 1e-2
MIN_QUANT_COSINE = 0.9  # Q4_K_M against F16 logits; a broken quantizer gives noise (cosine near 0)


class DoctorCheckError(PixtralError):
    """A doctor step ran but found wrong numbers or an inconsistent pipeline."""


@dataclass(frozen=True)
class Step:
    """One check: its outcome, how long it took, and what it found (or why it failed)."""

    name: str
    ok: bool
    seconds: float
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    steps: list[Step]
    work_dir: Path | None  # where the files are, when kept

    @property
    def ok(self) -> bool:
        return all(step.ok for step in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((step for step in self.steps if not step.ok), None)

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"ok": self.ok, "seconds": round(self.seconds, 3),
                "work_dir": str(self.work_dir) if self.work_dir else None,
                "steps": [{**asdict(step), "seconds": round(step.seconds, 3)} for step in self.steps]}


@dataclass
class _State:
    """What the steps hand each other."""

    root: Path
    files: ModelFiles | None = None
    checkpoint: Path | None = None
    model: PixtralModel | None = None
    conversation: list[Message] = field(default_factory=list)
    first: Completion | None = None
    logits: np.ndarray | None = None


def run_doctor(work_dir: Path | str | None = None, on_step: Callable[[Step], None] | None = None
               ) -> DoctorReport:
    """Run every check in order, stopping at the first failure; `on_step` sees each step as it ends.

    work_dir: where the tiny checkpoint and GGUFs go, and are kept; None: a temporary folder, removed.
    """
    keep = work_dir is not None
    state = _State(Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="pixtral-cpp-doctor-")))
    steps: list[Step] = []

    def record(step: Step) -> None:
        steps.append(step)
        if on_step is not None:
            on_step(step)

    try:
        for name, check in _CHECKS:
            record(_run_step(name, check, state))
            if not steps[-1].ok:
                break
    finally:  # Ctrl-C included: free the models and the temporary files
        cleanup = _run_step("cleanup", lambda s: _clean_up(s, keep), state)
    record(cleanup)
    return DoctorReport(steps, state.root if keep else None)


def _clean_up(state: _State, keep: bool) -> str:
    if state.model is not None:
        state.model.close()
    if keep:
        return f"files kept in {state.root}"
    shutil.rmtree(state.root)
    return f"removed {state.root}"


def _run_step(name: str, check: Callable[[_State], str], state: _State) -> Step:
    started = time.monotonic()
    try:
        detail, ok = check(state), True
    except Exception as exc:  # noqa: BLE001 - the report names every failure, whatever its type
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return Step(name, ok, time.monotonic() - started, detail)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DoctorCheckError(message)


# -- the checks ------------------------------------------------------------------------------------------


def _check_backend(state: _State) -> str:
    from pixtral_cpp.backend import installed_backend

    backend = installed_backend(presets={})  # the build as its libraries report it; no preset file needed
    _require(bool(backend.devices), "llama.cpp found no device at all (not even the CPU)")
    devices = ", ".join(f"{d.name} ({d.type}: {d.description})" for d in backend.devices)
    return (f"llama-cpp-python {backend.llama_cpp_python}, "
            f"ggml {backend.ggml_version} ({backend.ggml_commit}); "
            f"backends {'/'.join(backend.registries)}; GPU offload {'yes' if backend.gpu_offload else 'no'}; "
            f"devices {devices}")


def _write_checkpoint(state: _State) -> str:
    from pixtral_cpp.synthetic import write_synthetic_checkpoint

    # The small tekken keeps the vocabulary tiny and needs no mistral-common.
    state.checkpoint = write_synthetic_checkpoint(state.root / "Pixtral-doctor", layout="native",
                                                  shape="tiny", seed=0, tokenizer="small")
    size = sum(p.stat().st_size for p in state.checkpoint.iterdir())
    return f"{state.checkpoint} ({size / 1e6:.1f} MB)"


def _convert(state: _State) -> str:
    from pixtral_cpp.convert import ConvertOptions, convert_checkpoint

    assert state.checkpoint is not None
    result = convert_checkpoint(ConvertOptions(source=state.checkpoint, output_dir=state.root / "gguf",
                                               quant="F16", mmproj_quant="F16", force=True))
    state.files = ModelFiles(result.text_path, result.mmproj_path)
    return f"{result.text_path.name} + {result.mmproj_path.name}"


def _load(state: _State) -> str:
    fractions: list[float] = []
    state.model = PixtralModel(state.files, MODEL_OPTIONS,  # type: ignore[arg-type]
                               on_progress=lambda event: fractions.append(event.fraction))
    _require(bool(fractions) and fractions[-1] == 1.0 and fractions == sorted(fractions),
             f"load progress was not monotonic up to 1.0: {fractions[:5]}...{fractions[-3:]}")
    return f"n_ctx {state.model.n_ctx}, {len(fractions)} progress reports"


def _describe(state: _State) -> str:
    model = state.model
    assert model is not None
    width, height = IMAGE_SIZE
    state.conversation = [Message("user", (Image(_test_image(width, height)), Text("Describe this image.")))]
    state.first = first = model.chat(state.conversation, GREEDY)
    expected = pixtral_geometry(width, height).n_image_positions
    _require(first.stats.image_tokens == expected,
             f"the image took {first.stats.image_tokens} positions; "
             f"its {width}x{height} grid needs {expected}")
    _require(first.stats.images_encoded == 1, f"{first.stats.images_encoded} images encoded, expected 1")
    _require(first.stats.generated_tokens > 0 or first.stats.finish_reason == "stop", "nothing was generated")
    state.logits = logits = model.prompt_logits(state.conversation)
    _require(logits.ndim == 1 and logits.size > 1, f"logits of shape {logits.shape}")
    _require(bool(np.isfinite(logits).all()), f"{int((~np.isfinite(logits)).sum())} non-finite logits")
    _require(float(logits.std()) > 0, "every logit is the same: the model computes nothing")
    return (f"{expected} image positions, {first.stats.prompt_tokens} prompt tokens, "
            f"{first.stats.generated_tokens} tokens at {first.stats.generated_tokens_per_second:.0f} tok/s, "
            f"logits finite")


def _follow_up(state: _State) -> str:
    model, first = state.model, state.first
    assert model is not None and first is not None
    history = [*state.conversation, Message("assistant", (Text(first.text),)),
               Message("user", (Text("And the colours?"),))]
    again = model.chat(history, GREEDY)
    _require(again.stats.images_encoded == 0, "the follow-up question encoded the image again")
    _require(again.stats.reused_tokens >= first.stats.image_tokens,
             f"only {again.stats.reused_tokens} positions were reused "
             f"(the image alone is {first.stats.image_tokens})")
    with PixtralModel(state.files, MODEL_OPTIONS) as fresh:  # type: ignore[arg-type]
        fresh_logits = fresh.prompt_logits(state.conversation)  # first: every position evaluated anew
        fresh_answer = fresh.chat(history, GREEDY)
    _require(again.text == fresh_answer.text, f"with the reused prefix the answer is {again.text!r}, "
             f"from scratch {fresh_answer.text!r}")
    error = _relative_error(state.logits, fresh_logits)  # type: ignore[arg-type]
    _require(error < REUSE_TOLERANCE, f"prompt logits differ by {error:.2e} (relative) between the reused "
             f"KV cache and a fresh model")
    return (f"{again.stats.reused_tokens} positions reused; same answer and logits "
            f"(relative error {error:.1e}) as a fresh model")


def _quantize(state: _State) -> str:
    from pixtral_cpp.convert import ConvertOptions, convert_checkpoint

    assert state.checkpoint is not None
    result = convert_checkpoint(ConvertOptions(source=state.checkpoint, output_dir=state.root / "gguf-q4",
                                               quant="Q4_K_M", mmproj_quant="F16", force=True))
    with PixtralModel(ModelFiles(result.text_path, result.mmproj_path), MODEL_OPTIONS) as quantized:
        logits = quantized.prompt_logits(state.conversation)
    _require(bool(np.isfinite(logits).all()), "the Q4_K_M model produced non-finite logits")
    reference = state.logits
    assert reference is not None
    cosine = float(logits @ reference / (np.linalg.norm(logits) * np.linalg.norm(reference)))
    _require(cosine >= MIN_QUANT_COSINE,
             f"Q4_K_M logits have cosine {cosine:.3f} with F16 (need {MIN_QUANT_COSINE})")
    return f"{result.text_path.name}: logits cosine {cosine:.3f} with F16"


_CHECKS: tuple[tuple[str, Callable[[_State], str]], ...] = (
    ("backend", _check_backend),
    ("synthetic model", _write_checkpoint),
    ("convert", _convert),
    ("load", _load),
    ("describe", _describe),
    ("follow-up", _follow_up),
    ("quantize", _quantize),
)


def _test_image(width: int, height: int) -> np.ndarray:
    """A deterministic picture with structure (gradients) and detail (noise), (height, width, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 64, (height, width), dtype=np.int64)
    channels = (x * 255 // width, y * 255 // height, (x + y + noise) % 256)
    return np.stack(channels, axis=-1).astype(np.uint8)


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))
