"""Several sequences in one context (backend/sequences.py): decoded together as each alone, kept apart."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from pixtral_cpp.backend import TextModel, TextModelOptions, VisionContext
from pixtral_cpp.backend.sequences import Piece, decode_step
from pixtral_cpp.errors import BackendError, ModelError
from tests.gguf_helpers import fill_tensor

# Measured (tiny model, 2 threads) as the max |together - alone| over the largest logit: an F32 KV cache
# without flash attention 3.4e-7 (F32 weights) and 3.8e-7 (Q4_K_M), float32 rounding (the step's rows change
# the summation order); the defaults (F16 weights and KV, flash attention) 5.0e-4, one F16 rounding
# (2^-11 = 4.9e-4). Q4_K_M with F16 attention differs by 1.4e-2: docs/parallel.md, "Numerics".
EXACT = dict(kv_cache_type="f32", flash_attn="off"), 1e-6
DEFAULT = dict(kv_cache_type="f16", flash_attn="auto"), 2e-3


def options(n_seq: int, **kw) -> TextModelOptions:
    return TextModelOptions(n_ctx=512, n_batch=512, n_threads=2, n_seq=n_seq, **kw)


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def prompts(tiny_gguf_pair):
    """Three prompts: a long text, a short text, and one with an image between two token runs."""
    with TextModel(tiny_gguf_pair[0], options(1)) as text, \
            VisionContext(tiny_gguf_pair[1], text, threads=2, flash_attn="off") as vision:
        image = vision.encode_rgb(np.random.default_rng(7).integers(0, 256, (48, 64, 3), np.uint8)).embeddings
        rng = np.random.default_rng(3)
        words = lambda n: [int(t) for t in rng.integers(5, text.n_vocab, n)]  # noqa: E731
        return {"long": [1, 3, *words(40), 4], "short": [1, 3, *words(6), 4],
                "image": ([1, 3], image, [text.token_id("[IMG_END]"), *words(5), 4])}


def alone(text: TextModel, prompt, steps: int) -> list[np.ndarray]:
    """Logits after the prompt and after each of `steps` greedy tokens, in a one-sequence context."""
    text.clear()
    if isinstance(prompt, tuple):
        head, rows, tail = prompt
        text.eval_tokens(head)
        text.decode_embeddings(rows)
        out = [text.eval_tokens(tail)]
    else:
        out = [text.eval_tokens(prompt)]
    for _ in range(steps):
        out.append(text.eval_tokens([int(out[-1].argmax())]))
    return out


@pytest.mark.parametrize("model, setting", [("F32", EXACT), ("Q4_K_M", EXACT), ("F16", DEFAULT)],
                         ids=["exact", "quantized-exact", "default"])
def test_sequences_decoded_together_match_each_alone(converted, prompts, model, setting):
    kw, tolerance = setting
    path = converted(model)[0]
    with TextModel(path, options(1, **kw)) as single:
        expected = {name: alone(single, prompt, 3) for name, prompt in prompts.items()}
    head, rows, tail = prompts["image"]
    with TextModel(path, options(3, **kw)) as text:
        got: dict[str, list[np.ndarray]] = {"long": [], "short": [], "image": []}
        first = decode_step(text, [Piece.of_tokens(0, prompts["long"]), Piece.of_tokens(1, prompts["short"]),
                                   Piece.of_tokens(2, head, logits=False)])
        got["long"].append(first[0])
        got["short"].append(first[1])
        # Continuous batching: the text sequences generate while the image is prefilled, its rows in a step
        # of their own kind beside their tokens, then its last run of tokens beside their next ones.
        for image_piece in (Piece.of_embeddings(2, rows), Piece.of_tokens(2, tail)):
            step = [Piece.of_tokens(0, [int(got["long"][-1].argmax())]),
                    Piece.of_tokens(1, [int(got["short"][-1].argmax())]), image_piece]
            out = decode_step(text, step)
            got["long"].append(out[0])
            got["short"].append(out[1])
            if 2 in out:
                got["image"].append(out[2])
        for _ in range(3):
            out = decode_step(text, [Piece.of_tokens(seq, [int(got[name][-1].argmax())])
                                     for seq, name in enumerate(("long", "short", "image"))])
            for seq, name in enumerate(("long", "short", "image")):
                got[name].append(out[seq])
        for name in got:
            n = min(len(got[name]), len(expected[name]))
            for step, (a, b) in enumerate(zip(got[name][:n], expected[name][:n], strict=True)):
                assert relative(a, b) <= tolerance, f"{name}, step {step}: {relative(a, b):.2e} > {tolerance:.0e}"
                assert a.argmax() == b.argmax(), f"{name}, step {step}"
        assert text.positions(0) == len(prompts["long"]) + 5 and text.positions(1) == len(prompts["short"]) + 5
        assert text.positions(2) == len(head) + len(rows) + len(tail) + 3


def test_a_step_past_n_batch_is_several_decodes_with_each_sequences_logits(tiny_gguf_pair):
    first, second = [1, 3, *range(100, 400)], [1, 3, *range(500, 760)]  # 302 + 262 rows > n_batch 512
    with TextModel(tiny_gguf_pair[0], options(1, **EXACT[0])) as single:
        expected = [single.eval_tokens(first)]
        single.clear()
        expected.append(single.eval_tokens(second))
    with TextModel(tiny_gguf_pair[0], options(2, **EXACT[0])) as text:
        out = decode_step(text, [Piece.of_tokens(0, first), Piece.of_tokens(1, second)])
        for seq in (0, 1):
            assert relative(out[seq], expected[seq]) <= EXACT[1]
        assert (text.positions(0), text.positions(1)) == (len(first), len(second))


@pytest.fixture
def three(tiny_gguf_pair):
    with TextModel(tiny_gguf_pair[0], options(3, **EXACT[0])) as text:
        decode_step(text, [Piece.of_tokens(seq, [1, 3, *range(10 + seq, 30 + 3 * seq), 4], logits=False)
                           for seq in range(3)])
        yield text


def states(text: TextModel) -> list[bytes]:
    return [bytes(text.sequence_state(seq)) for seq in range(text.n_seq)]


def test_trimming_or_clearing_one_sequence_leaves_the_others(three):
    expected = decode_step(three, [Piece.of_tokens(1, [7])])[1]
    three.trim(three.positions(1) - 1, seq=1)
    before = states(three)
    lengths = [three.positions(seq) for seq in range(3)]
    three.trim(5, seq=1)
    assert [three.positions(seq) for seq in range(3)] == [lengths[0], 5, lengths[2]]
    after = states(three)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    three.clear(2)
    assert three.positions(2) == 0 and three.positions(0) == lengths[0]
    assert states(three)[0] == before[0]
    # Decoded again (alone now: other matmul shapes), sequence 1 answers as before; nothing of the others leaked.
    decode_step(three, [Piece.of_tokens(1, [*range(14, 33), 4], logits=False)])
    assert relative(decode_step(three, [Piece.of_tokens(1, [7])])[1], expected) <= EXACT[1]


def test_a_state_moves_between_sequences_and_one_sequence_contexts(three, tiny_gguf_pair):
    """The disk cache's states (of sequence 0 of a plain context) restore into any sequence, and back."""
    state = three.sequence_state(2)
    expected = decode_step(three, [Piece.of_tokens(2, [7])])[2]
    three.trim(three.positions(2) - 1, seq=2)
    assert three.restore_sequence_state(state, seq=0) == three.positions(2)
    np.testing.assert_allclose(decode_step(three, [Piece.of_tokens(0, [7])])[0], expected, rtol=0, atol=1e-5)
    with TextModel(tiny_gguf_pair[0], options(1, **EXACT[0])) as plain:
        assert plain.restore_sequence_state(state) == three.positions(2)
        np.testing.assert_allclose(plain.eval_tokens([7]), expected, rtol=0, atol=1e-5)
        assert three.restore_sequence_state(plain.sequence_state(), seq=1) == plain.n_past


@pytest.mark.parametrize("pieces, error, message", [
    (lambda t: [Piece.of_tokens(0, [5]), Piece.of_tokens(1, [10 ** 6])], ModelError, "token ids must be in"),
    (lambda t: [Piece.of_tokens(0, [5]), Piece.of_tokens(0, [6])], ValueError, "two pieces"),
    (lambda t: [Piece.of_tokens(3, [5])], ValueError, "sequence 3 is not one of"),
    (lambda t: [Piece.of_tokens(0, [5]), Piece.of_tokens(1, [5] * 500)], BackendError, "exceed the context"),
    (lambda t: [Piece.of_embeddings(1, np.full((2, t.n_embd), math.nan))], ModelError, "NaN"),
    (lambda t: [Piece.of_embeddings(1, np.zeros((2, 3)))], ModelError, "do not fit"),
    (lambda t: [], ValueError, "at least one piece"),
])
def test_a_refused_step_changes_nothing(three, pieces, error, message):
    before = states(three)
    with pytest.raises(error, match=message):
        decode_step(three, pieces(three))
    assert states(three) == before


def test_a_failed_step_rolls_its_sequences_back(tiny_gguf_pair, tmp_path):
    """NaN logits (a corrupt output norm) are found after llama.cpp decoded the step: its sequences go back."""
    corrupt = fill_tensor(tiny_gguf_pair[0], tmp_path / "nan.gguf", "output_norm.weight", math.nan)
    with TextModel(corrupt, options(3, **EXACT[0])) as text:
        decode_step(text, [Piece.of_tokens(seq, [1, 3, 20 + seq, 4], logits=False) for seq in range(3)])
        before = states(text)
        # More rows than n_batch (512): two llama_decode calls, the failure found after the second.
        with pytest.raises(ModelError, match="NaN/infinite logits"):
            decode_step(text, [Piece.of_tokens(0, [5] * 300, logits=False), Piece.of_tokens(1, [6] * 200)])
        assert [text.positions(seq) for seq in range(3)] == [4, 4, 4]
        assert states(text) == before


def test_one_sequence_is_the_plain_context(tiny_gguf_pair):
    ids = [1, 3, *range(40, 60), 4]
    with TextModel(tiny_gguf_pair[0], options(1, **EXACT[0])) as plain:
        assert plain.n_seq == 1 and plain.n_ctx == 512
        expected = plain.eval_tokens(ids)
        plain.clear()
        assert np.array_equal(decode_step(plain, [Piece.of_tokens(0, ids)])[0], expected)  # bit for bit
        with pytest.raises(ValueError, match="sequence 1 is not one of this context's 1"):
            plain.positions(1)
    with TextModel(tiny_gguf_pair[0], options(4, **EXACT[0])) as four:
        assert four.n_seq == 4 and four.n_ctx == 512  # per sequence; the context holds 4 x 512 cells
        # The same prompt in sequence 3 beside sequence 0's cells: the attention spans them (masked), rounding only.
        assert relative(decode_step(four, [Piece.of_tokens(3, ids)])[3], four.eval_tokens(ids)) <= EXACT[1]


def test_memory_per_position_is_what_llama_cpp_stores(tiny_gguf_pair):
    with TextModel(tiny_gguf_pair[0], options(2, kv_cache_type="f16")) as text:
        decode_step(text, [Piece.of_tokens(0, [1, 3, 5], logits=False)])
        small = len(text.sequence_state(0))
        decode_step(text, [Piece.of_tokens(0, list(range(10, 20)), logits=False)])
        per_position = (len(text.sequence_state(0)) - small) / 10
        # Each cell also carries its position, sequence count and id (3 x 4 bytes).
        assert per_position == text.kv_bytes_per_position + 12


@pytest.mark.parametrize("n_seq", [0, 257])
def test_a_number_of_sequences_llama_cpp_cannot_hold_is_refused(n_seq):
    with pytest.raises(ValueError, match="n_seq must be in 1..256"):
        options(n_seq)


@pytest.mark.parametrize("model", ["F16", "Q4_K_M"])
def test_tokens_given_as_their_embedding_rows_decode_the_same(converted, model):
    """What lets a step hold tokens beside image rows in one batch (docs/parallel.md, "mixed steps")."""
    path = converted(model)[0]
    table = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    ids = [1, 3, *range(200, 230), 4]
    rows = dequantize(np.asarray(table.data)[ids], table.tensor_type).reshape(len(ids), -1)
    with TextModel(path, options(2, **DEFAULT[0])) as text:
        out = decode_step(text, [Piece.of_tokens(0, ids), Piece.of_embeddings(1, rows, logits=True)])
        assert np.array_equal(out[0], out[1])  # bit for bit
