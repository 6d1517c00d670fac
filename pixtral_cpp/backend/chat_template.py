"""llama.cpp's built-in (non-Jinja) chat templates, through its C API ``llama_chat_apply_template``.

This is what ``llama-mtmd-cli`` and ``llama-cli`` use without ``--jinja``: llama.cpp reads the GGUF's
``tokenizer.chat_template``, guesses which of its hard-coded formats it is (``llm_chat_detect_template``
in src/llama-chat.cpp) and renders that format in C++, never running the Jinja. pixtral-cpp calls it to
check that its own template is taken for ``mistral-v3-tekken`` (docs/other-tools.md).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from pixtral_cpp.backend._native import bindings
from pixtral_cpp.errors import BackendError


def apply_builtin_chat_template(template: str, messages: Sequence[tuple[str, str]],
                                add_assistant: bool = True) -> str:
    """Render (role, content) messages the way llama.cpp's legacy chat route does.

    ``template`` is either a built-in name (``"mistral-v3-tekken"``, ``"llama2"``) or a template's source,
    which llama.cpp maps to a built-in format by looking for marker strings. Raises BackendError when
    llama.cpp recognises no format in it (the C function returns -1).
    """
    llama, _ = bindings()
    encoded = [(role.encode("utf-8"), content.encode("utf-8")) for role, content in messages]
    chat = (llama.llama_chat_message * max(len(encoded), 1))(
        *(llama.llama_chat_message(role, content) for role, content in encoded))
    tmpl = template.encode("utf-8")
    # llama.cpp returns the full length when the buffer is too small: size it, then render again.
    needed = sum(len(role) + len(content) for role, content in encoded) * 2 + 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(needed)
        written = llama.llama_chat_apply_template(tmpl, chat, len(encoded), add_assistant, buf, needed)
        if written < 0:
            raise BackendError("llama.cpp recognises no built-in chat format in this template")
        if written <= needed:
            return buf.raw[:written].decode("utf-8")
        needed = written
    raise BackendError("llama.cpp's chat template output kept growing")  # pragma: no cover - C contract
