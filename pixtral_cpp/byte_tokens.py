"""GPT-2's byte→unicode table: how a byte-level BPE vocabulary stores token bytes as GGUF strings.

Shared by the converter (bytes → strings) and the runtime's tekken tokenizer (strings → bytes).
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte→character table: printable bytes stay, the other 68 move to U+0100 upwards
    (the rule as docs/gguf-layout.md §5.2 states it; llama.cpp's BPE decoder inverts it)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {byte: chr(byte) for byte in kept}
    shifted = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + n) for n, byte in enumerate(shifted)})
    return table


@lru_cache(maxsize=1)
def _latin1_translation() -> dict[int, str]:
    # bytes.decode("latin-1") maps byte b to chr(b); translating only the moved bytes is far faster than
    # joining per byte over 150k tokens.
    return {byte: char for byte, char in _byte_to_unicode().items() if ord(char) != byte}


@lru_cache(maxsize=1)
def _inverse_translation() -> dict[int, str]:
    # The moved characters go back to their bytes (as latin-1 characters); a character that stands for no
    # byte (a raw space, U+0100 onwards beyond the table) becomes U+FFFF, which latin-1 cannot encode.
    table = {ord(char): chr(byte) for byte, char in _byte_to_unicode().items() if ord(char) != byte}
    table.update({byte: "\uffff" for byte in range(256) if _byte_to_unicode()[byte] != chr(byte)})
    return table


def token_string(token_bytes: bytes) -> str:
    """The GGUF string of an ordinary token: its bytes through GPT-2's byte→unicode table."""
    return token_bytes.decode("latin-1").translate(_latin1_translation())


def token_bytes_of(token: str) -> bytes:
    """Inverse of `token_string`; raises KeyError for characters outside the byte table."""
    try:
        return strings_to_bytes(token)
    except UnicodeEncodeError:
        raise KeyError(token) from None


def strings_to_bytes(strings: str) -> bytes:
    """The bytes of one or more token strings joined together: one byte per character, so a joined string's
    bytes split at the same offsets as its characters. UnicodeEncodeError for a character outside the table."""
    return strings.translate(_inverse_translation()).encode("latin-1")
