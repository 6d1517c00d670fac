"""Streaming detokenization: token pieces (bytes) in, text out, never half a UTF-8 character."""

from __future__ import annotations

import codecs


class IncrementalDecoder:
    """Turns a stream of token pieces into text chunks.

    A byte-level vocabulary such as tekken splits one emoji or CJK character over several tokens, so a
    piece may end inside a character: those trailing bytes are held back until the next piece completes
    them. Invalid bytes become U+FFFD, as does an incomplete character left over at :meth:`flush`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        """Text completed by ``piece``; may be "" while a character is still incomplete."""
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream; the decoder is then reset."""
        tail = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return tail

    @property
    def pending(self) -> bytes:
        """Bytes held back because they start a character that is not complete yet."""
        return self._decoder.getstate()[0]
