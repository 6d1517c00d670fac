"""The token loop: sample, stream text without broken characters, honour stop strings and limits."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from pixtral_cpp.backend import IncrementalDecoder, Sampler, TextModel
from pixtral_cpp.control import CancelToken
from pixtral_cpp.kv_cache import KVCache
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import FinishReason, TextChunk


@dataclass(frozen=True)
class Outcome:
    finish_reason: FinishReason
    text: str  # everything yielded
    token_ids: tuple[int, ...]  # the generated tokens, end-of-generation excluded

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class _StopStrings:
    """Cuts the answer at the first stop string, holding back text that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at >= 0:
                self.hit, out, self.pending = True, self.pending[:at], ""
                return out
        keep = max((self._held_back(stop) for stop in self.stops), default=0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back(self, stop: str) -> int:
        """Length of the longest end of the pending text that begins `stop` (longest first, so the
        usual case, no match at all, costs one pass per length only while lengths remain)."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0


def generate_tokens(text: TextModel, kv: KVCache, options: GenerationOptions, seed: int | None,
                    budget: int, cancel: CancelToken | None = None, grammar: str | None = None
                    ) -> Generator[TextChunk, None, Outcome]:
    """Generate after a prompt evaluated into `kv` (the KV cache of `text`), appending each token to it.

    `cancel` is checked before each token: the KV cache then holds exactly the prompt and the tokens
    decoded so far, so the next call reuses it as usual.
    """
    sampler = Sampler(text, options.sampling(seed), grammar=grammar)
    decoder, stops = IncrementalDecoder(), _StopStrings(options.stop)
    finish = "length"
    ids: list[int] = []
    pieces: list[str] = []
    try:
        while len(ids) < budget:
            if cancel is not None and cancel.cancelled:
                finish = "cancelled"
                break
            token = sampler.sample()
            if text.is_end_of_generation(token):
                kv.append_tokens([token])  # keep `</s>` in the cache: the next turn's prompt has it
                finish = "stop"
                break
            ids.append(token)
            piece = stops.feed(decoder.feed(text.token_piece(token)))
            if piece:
                pieces.append(piece)
                yield TextChunk(piece)
            if stops.hit:
                finish = "stop_string"
                break
            kv.append_tokens([token])
        tail = "" if stops.hit else stops.feed(decoder.flush()) + stops.flush()
        if tail:
            pieces.append(tail)
            yield TextChunk(tail)
    except GeneratorExit:
        finish = "cancelled"
        raise
    finally:
        sampler.close()
    return Outcome(finish, "".join(pieces), tuple(ids))  # type: ignore[arg-type]

