"""A llama.cpp text model with one inference context: tokenize, evaluate tokens or embeddings, logits.

The context holds `n_seq` sequences (default 1, sequence 0). The single-sequence calls take `seq` and
default to 0; several sequences are decoded together by backend/sequences.py (docs/parallel.md).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import gguf
import numpy as np

from pixtral_cpp.backend._native import bindings, is_gguf, last_native_error
from pixtral_cpp.backend.build_info import repacking_is_safe
from pixtral_cpp.errors import BackendError, ModelError

_GGML_TYPE = {"f32": 0, "f16": 1}  # enum ggml_type values used for the KV cache
_TYPE_BYTES = {"f32": 4, "f16": 2}
MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ (src/llama-cparams.h): llama.cpp asserts on a sequence id past it
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # enum llama_flash_attn_type

LoadProgress = Callable[[float], None]  # llama.cpp's load progress, 0.0..1.0


@dataclass(frozen=True)
class TextModelOptions:
    """How to load the text GGUF and size its context."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None  # None: every core
    n_gpu_layers: int = 0
    # llama.cpp's CPU "extra buffer types": a repacked copy of the quantized weights. Measured at 12B
    # (docs/benchmarks.md): generation +50 %, prompt evaluation -30 % with AVX-512 (about equal with
    # AVX2), load 3x slower; it segfaults on CPUs with AMX (see repacking_is_safe). Off by default.
    repack_weights: bool = False
    # None: map the file, unless repacking (its mapped pages would stay resident beside the copy, +5 GB).
    use_mmap: bool | None = None
    # "f32" makes llama.cpp match a float32 reference to ~5e-7; "f16" (llama.cpp's default) halves the memory.
    kv_cache_type: Literal["f16", "f32"] = "f16"
    # "auto" turns flash attention on for the CPU too, whose kernel works in F16 even with an F32 KV
    # cache (8e-4 relative logit error on the tiny model); "off" is needed for exact parity.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    # Sequences the context holds, each with up to n_ctx positions of its own (docs/parallel.md). 1 is a
    # plain context; more make one unified KV cache of n_ctx * n_seq cells that every sequence draws on.
    n_seq: int = 1

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.n_batch < 1:
            raise ValueError(f"n_ctx ({self.n_ctx}) and n_batch ({self.n_batch}) must be positive")
        if not 1 <= self.n_seq <= MAX_SEQUENCES:
            raise ValueError(f"n_seq must be in 1..{MAX_SEQUENCES}, not {self.n_seq}")
        if self.kv_cache_type not in _GGML_TYPE:
            raise ValueError(f"kv_cache_type must be 'f16' or 'f32', not {self.kv_cache_type!r}")
        if self.flash_attn not in FLASH_ATTN:
            raise ValueError(f"flash_attn must be 'auto', 'on' or 'off', not {self.flash_attn!r}")

    @property
    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1


class Closeable(Protocol):
    def close(self) -> None: ...


class TextModel:
    """Owns a ``llama_model`` and one ``llama_context`` (``n_seq`` sequences); frees both on :meth:`close`."""

    def __init__(self, path: Path, options: TextModelOptions | None = None, *,
                 on_progress: LoadProgress | None = None) -> None:
        """``on_progress`` gets llama.cpp's load fraction; an exception it raises aborts the load, re-raised."""
        self.path = Path(path)
        self.options = options or TextModelOptions()
        self._llama, _ = bindings()
        self._dependents: weakref.WeakSet[Any] = weakref.WeakSet()
        self._model = self._load_model(on_progress)
        self._ctx = self._new_context()
        # Runs on close(), garbage collection or interpreter exit, whichever comes first; context first.
        self._finalizer = weakref.finalize(self, _free_text, self._llama, self._ctx, self._model)
        self._vocab = self._llama.llama_model_get_vocab(self._model)
        self.n_vocab: int = self._llama.llama_vocab_n_tokens(self._vocab)
        self.n_embd: int = self._llama.llama_model_n_embd_inp(self._model)
        self.n_seq: int = self.options.n_seq
        # Positions one sequence may hold (the context's cells are n_ctx * n_seq, rounded up by llama.cpp).
        self.n_ctx: int = self._llama.llama_n_ctx(self._ctx) // self.n_seq
        self.kv_bytes_per_position: int = self._kv_bytes_per_position()

    def _load_model(self, on_progress: LoadProgress | None) -> int:
        if not self.path.is_file():
            raise ModelError(f"text model {self.path} does not exist")
        if not is_gguf(self.path):
            raise ModelError(f"text model {self.path} is not a GGUF file")
        llama = self._llama
        params = llama.llama_model_default_params()
        params.n_gpu_layers = self.options.n_gpu_layers
        repack = self.options.repack_weights
        if repack and not repacking_is_safe():  # checked here: llama.cpp would segfault on the first decode
            raise BackendError("weight repacking crashes on this CPU (llama.cpp's AMX matmul, "
                               "ggml-org/llama.cpp#20824); leave it off, or use a build without AMX: "
                               "pixtral-cpp backend install cpu")
        params.use_extra_bufts = repack
        use_mmap = not repack if self.options.use_mmap is None else self.options.use_mmap
        params.load_mode = llama.LLAMA_LOAD_MODE_MMAP if use_mmap else llama.LLAMA_LOAD_MODE_NONE
        relay = _ProgressRelay(llama, on_progress) if on_progress is not None else None
        if relay is not None:
            params.progress_callback = relay.c_callback  # `relay` keeps it alive until loading returns
        model = llama.llama_model_load_from_file(bytes(self.path), params)
        if relay is not None and relay.error is not None:
            if model:
                llama.llama_model_free(model)
            raise relay.error
        if not model:
            raise ModelError(f"llama.cpp could not load {self.path}: {last_native_error()}")
        return model

    def _new_context(self) -> int:
        llama, opts = self._llama, self.options
        params = llama.llama_context_default_params()
        params.n_ctx = opts.n_ctx * opts.n_seq
        params.n_batch = params.n_ubatch = opts.n_batch
        params.n_seq_max = opts.n_seq
        # One pool of cells (one "stream") for every sequence, as llama-server's automatic --parallel. Split
        # streams would cut each decode into equal per-sequence ubatches (a generating sequence's one token
        # beside another's prefill chunk would cost two passes over the weights) and refuse the disk cache's
        # states of a one-sequence context ("n_stream mismatch"). n_seq 1 keeps llama.cpp's default.
        params.kv_unified = opts.n_seq > 1
        params.n_threads = params.n_threads_batch = opts.threads
        params.type_k = params.type_v = _GGML_TYPE[opts.kv_cache_type]
        params.flash_attn_type = FLASH_ATTN[opts.flash_attn]
        params.no_perf = True
        ctx = llama.llama_init_from_model(self._model, params)
        if not ctx:
            llama.llama_model_free(self._model)
            raise BackendError(f"llama.cpp could not create a context for {self.path}: {last_native_error()}")
        return ctx

    def _kv_bytes_per_position(self) -> int:
        """Bytes of K and V one position costs in every layer, by the KV type and the model's shape."""
        llama, model = self._llama, self._model
        arch = self._meta(gguf.Keys.General.ARCHITECTURE)
        n_head, n_head_kv = llama.llama_model_n_head(model), llama.llama_model_n_head_kv(model)
        default = llama.llama_model_n_embd(model) // max(n_head, 1)  # llama.cpp's rule without the keys
        key = int(self._meta(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch)) or default)
        value = int(self._meta(gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch)) or default)
        return llama.llama_model_n_layer(model) * n_head_kv * (key + value) * _TYPE_BYTES[self.options.kv_cache_type]

    def _meta(self, key: str) -> str:
        """A GGUF metadata value of the loaded model as text, "" when it has none."""
        buf = ctypes.create_string_buffer(256)
        n = self._llama.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

    # -- resources -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model; objects built on this model (VisionContext) are closed first."""
        for dependent in list(self._dependents):
            dependent.close()
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> TextModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _register_dependent(self, dependent: Closeable) -> None:
        self._dependents.add(dependent)

    def _handles(self) -> tuple[int, int]:
        if self.closed:
            raise BackendError(f"text model {self.path} is closed")
        return self._model, self._ctx

    # -- vocabulary --------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS, ``parse_special`` turns "[INST]" into its id."""
        self._handles()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):  # a negative return is the size actually needed
            buf = (ctypes.c_int32 * capacity)()
            n = self._llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n
        raise BackendError(f"llama.cpp could not tokenize {text[:40]!r}")

    def detokenize(self, tokens: Sequence[int], *, render_special: bool = False) -> str:
        """Text of ``tokens``; control tokens such as [INST] appear only with ``render_special``."""
        self._handles()
        ids = (ctypes.c_int32 * len(tokens))(*tokens)
        capacity = 8 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_detokenize(self._vocab, ids, len(tokens), buf, capacity, False, render_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            capacity = -n
        raise BackendError("llama.cpp could not detokenize the tokens")

    def token_piece(self, token: int) -> bytes:
        """Bytes ``token`` adds to the answer; control tokens such as </s> or [INST] add b""."""
        self._check_token(token)
        capacity = 32
        for _ in range(2):  # a negative return is the size actually needed
            buf = ctypes.create_string_buffer(capacity)
            n = self._llama.llama_token_to_piece(self._vocab, token, buf, capacity, 0, False)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n
        raise BackendError(f"llama.cpp could not render token {token}")

    def is_end_of_generation(self, token: int) -> bool:
        """True for the tokens that end an answer (</s> for Pixtral)."""
        self._check_token(token)
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))

    def _check_token(self, token: int) -> None:
        # llama.cpp looks pieces up with std::vector::at: an unknown id would abort the process.
        self._handles()
        if not 0 <= token < self.n_vocab:
            raise ModelError(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")

    def token_id(self, piece: str) -> int:
        """Id of a special token given by its text, e.g. "[IMG_END]"."""
        ids = self.tokenize(piece, add_special=False, parse_special=True)
        if len(ids) != 1:
            raise ModelError(f"{piece!r} is not a single token in {self.path} (got {ids})")
        return ids[0]

    # -- evaluation ----------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Positions sequence 0 holds in the KV cache (its next token goes to this position)."""
        return self.positions(0)

    def positions(self, seq: int = 0) -> int:
        """Positions sequence ``seq`` holds (its next token goes to this position)."""
        mem = self._memory(seq)
        return self._llama.llama_memory_seq_pos_max(mem, seq) + 1

    def clear(self, seq: int | None = None) -> None:
        """Forget everything in the KV cache, or only what sequence ``seq`` holds."""
        if seq is None or self.n_seq == 1:  # one sequence: the whole cache, as always
            mem = self._memory(0 if seq is None else seq)
            self._llama.llama_memory_clear(mem, True)
        else:
            self._llama.llama_memory_seq_rm(self._memory(seq), seq, -1, -1)

    def trim(self, n_keep: int, seq: int = 0) -> None:
        """Keep the first ``n_keep`` positions of sequence ``seq``, drop the rest (reuse of a shared prefix)."""
        if not self._llama.llama_memory_seq_rm(self._memory(seq), seq, n_keep, -1):
            raise BackendError(f"llama.cpp could not trim the KV cache to {n_keep} positions")

    def sequence_state(self, seq: int = 0) -> bytearray:
        """llama.cpp's serialized state of sequence ``seq`` (its KV cells), for restore_sequence_state."""
        self._memory(seq)
        ctx = self._ctx
        size = self._llama.llama_state_seq_get_size(ctx, seq)
        data = bytearray(size)  # written in place by llama.cpp: no second copy of hundreds of MB
        written = self._llama.llama_state_seq_get_data(ctx, _bytes_pointer(data), size, seq) if size else 0
        if size == 0 or written != size:
            raise BackendError(f"llama.cpp could not copy the KV cache's state ({written} of {size} bytes)")
        return data

    def restore_sequence_state(self, data: bytearray, seq: int = 0) -> int:
        """Replace sequence ``seq`` with a state from sequence_state (of any sequence); the positions it holds now.

        llama.cpp checks the state's layout and refuses (0) one that does not fit this context; the
        sequence is then emptied, never left half restored.
        """
        self._memory(seq)
        ok = bool(data) and self._llama.llama_state_seq_set_data(self._ctx, _bytes_pointer(data), len(data), seq) != 0
        if not ok:
            self.clear(seq)
            raise BackendError(f"llama.cpp refused a saved KV cache state of {len(data)} bytes: "
                               f"{last_native_error()}")
        return self.positions(seq)

    def _memory(self, seq: int) -> int:
        """The context's memory handle, once ``seq`` is known to be one of its sequences."""
        _, ctx = self._handles()
        # llama.cpp asserts (aborts the process) on a sequence id it does not hold.
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"sequence {seq} is not one of this context's {self.n_seq} (0..{self.n_seq - 1})")
        return self._llama.llama_get_memory(ctx)

    def eval_tokens(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens``; logits of the last position (n_vocab,) or of every one (n_tokens, n_vocab)."""
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("eval_tokens needs a non-empty sequence of token ids")
        if ids.min() < 0 or ids.max() >= self.n_vocab:
            raise ModelError(f"token ids must be in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        return self._decode(ids, None, "all" if all_logits else "last")

    def decode_embeddings(self, embeddings: np.ndarray) -> int:
        """Append one position per row of ``embeddings`` (n, n_embd); returns the new n_past."""
        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd or rows.shape[0] == 0:
            raise ModelError(f"embeddings of shape {embeddings.shape} do not fit a model with n_embd {self.n_embd}")
        self._decode(None, rows, "none")
        return self.n_past

    def _decode(self, ids: np.ndarray | None, rows: np.ndarray | None, outputs: str) -> np.ndarray:
        _, ctx = self._handles()
        n = len(ids) if ids is not None else len(rows)  # type: ignore[arg-type]
        start = self.n_past
        if start + n > self.n_ctx:
            raise BackendError(f"{start} + {n} positions exceed the context of {self.n_ctx}; raise n_ctx")
        step, logits = self.options.n_batch, []
        for off in range(0, n, step):
            m = min(step, n - off)
            flags = np.zeros(m, dtype=np.int8)
            if outputs == "all":
                flags[:] = 1
            elif outputs == "last" and off + m == n:
                flags[-1] = 1
            part_ids = ids[off : off + m] if ids is not None else None
            part_rows = rows[off : off + m] if rows is not None else None
            self._decode_batch(ctx, part_ids, part_rows, start + off, flags)
            if outputs == "all":
                logits.append(self._copy_logits(ctx, m))
        if outputs == "last":
            return self._copy_logits(ctx, 1)[0]
        return np.concatenate(logits) if logits else np.empty((0, self.n_vocab), np.float32)

    def _decode_batch(
        self, ctx: int, ids: np.ndarray | None, rows: np.ndarray | None, pos0: int, flags: np.ndarray
    ) -> None:
        m = len(flags)
        self._decode_rows(ctx, ids, rows, np.arange(pos0, pos0 + m, dtype=np.int32), np.zeros(m, np.int32), flags)

    def _decode_rows(self, ctx: int, ids: np.ndarray | None, rows: np.ndarray | None, pos: np.ndarray,
                     seqs: np.ndarray, flags: np.ndarray) -> None:
        """One llama_decode of at most n_batch rows: row i at position pos[i] of sequence seqs[i]."""
        llama = self._llama
        m = len(flags)
        # The batch points into these numpy arrays; llama_decode copies what it needs before returning.
        pos = np.ascontiguousarray(pos, dtype=np.int32)
        n_seq = np.ones(m, dtype=np.int32)
        seq_ids = np.ascontiguousarray(seqs, dtype=np.int32)
        seq_ptrs = seq_ids.ctypes.data + seq_ids.itemsize * np.arange(m, dtype=np.uintp)  # &seq_ids[i]
        batch = llama.llama_batch()
        batch.n_tokens = m
        batch.token = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if ids is not None else None
        batch.embd = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if rows is not None else None
        batch.pos = pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.n_seq_id = n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        batch.seq_id = seq_ptrs.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        batch.logits = flags.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        status = llama.llama_decode(ctx, batch)
        if status != 0:
            raise BackendError(f"llama_decode failed with status {status}: {last_native_error()}")

    def _copy_logits(self, ctx: int, n_rows: int, row: int = -1) -> np.ndarray:
        """The logits of the last decode: of its batch row `row` (n_rows 1), or of every output row."""
        ptr = self._llama.llama_get_logits_ith(ctx, row) if n_rows == 1 else self._llama.llama_get_logits(ctx)
        if not ptr:
            raise BackendError("llama.cpp returned no logits")
        logits = np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab)).copy()
        # A weight full of NaN passes every header check; sampling from NaN gives an empty answer, not an error.
        if not np.isfinite(logits).all():
            raise ModelError(f"the model produced NaN/infinite logits: {self.path} is probably corrupt; "
                             "re-convert or re-download it")
        return logits


class _ProgressRelay:
    """llama.cpp's progress_callback: forwards the fraction; an exception stops loading and is kept.

    An exception cannot cross the C frames of the loader, so it is stored, False tells llama.cpp to
    abort the load, and _load_model re-raises it.
    """

    def __init__(self, llama: Any, on_progress: LoadProgress) -> None:
        self.on_progress = on_progress
        self.error: BaseException | None = None
        self.c_callback = llama.llama_progress_callback(self._call)

    def _call(self, progress: float, _user_data: Any) -> bool:
        if self.error is not None:
            return False
        try:
            self.on_progress(float(progress))
        except BaseException as exc:  # noqa: BLE001 - re-raised by _load_model
            self.error = exc
            return False
        return True


def _bytes_pointer(data: bytearray) -> Any:
    """A uint8 pointer into `data` itself (no copy)."""
    return (ctypes.c_uint8 * len(data)).from_buffer(data)


def _free_text(llama: Any, ctx: int, model: int) -> None:
    llama.llama_free(ctx)  # the context refers to the model: free it first
    llama.llama_model_free(model)
