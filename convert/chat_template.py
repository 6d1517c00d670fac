"""Pixtral's chat format as a Jinja template for `tokenizer.chat_template` (docs/runtime-notes.md §3).

The template reproduces what mistral-common 1.13.1 encodes for Pixtral (tokenizer v3, tekken), when
llama-cpp-python's `MTMDChatHandler` renders it and libmtmd tokenizes the result:

* no literal `<s>`: mtmd adds BOS itself (a template BOS would give two). The template emits only the
  `bos_token` variable, which MTMDChatHandler sets to "" and llama-cpp-python's text-only
  Jinja2ChatFormatter sets to "<s>" (that path tokenizes without adding BOS), so both get one BOS;
* `[INST]content[/INST]` per user turn and `content</s>` per assistant turn, no spaces (tekken);
* consecutive messages of one role are merged and adjacent text parts joined with a blank line, as
  mistral-common's request normalizer does; a system message also ends such a run;
* all system messages, joined by a blank line, are prepended with "\\n\\n" to the LAST user message;
* an image is a media marker where it appears; mtmd puts the image and `[IMG_END]` there. MTMDChatHandler
  turns `image_url` parts into text parts holding mtmd's `<__media__>`; llama-server hands over a message
  holding images as one string with its own `<__media_` + 32 letters or digits + `__>` markers in it. Both
  shapes are read as images inside any text, and emitted unchanged;
* a user turn that is exactly [text, image] after merging has its image moved first, as mistral-common
  does (`InstructTokenizerV3._maybe_put_image_first`); images never change order relative to each other,
  so the handler's bitmaps still line up with the markers;
* if the conversation does not start with a user turn, an empty one is inserted (mistral-common too);
* assistant text loses trailing spaces (mistral-common rstrips " ").

llama.cpp's non-Jinja route never runs this template: it looks for marker strings in its source and takes
it for its built-in mistral-v3-tekken format (docs/other-tools.md), because the source holds `[AVAILABLE_TOOLS]`
and the literal `"[INST]"`, and no ` [INST]` or `[SYSTEM_PROMPT]` (which would pick mistral-v1 or v7).

Known difference: mistral-common tokenizes the system prompt's "\\n\\n" separately from a user turn's first
text part when the turn holds images; llama.cpp tokenizes them together. The two agree unless that text
starts with a line break.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# mtmd's default media marker (mtmd_default_marker()); the handler substitutes it for every image.
MEDIA_MARKER = "<__media__>"

PIXTRAL_CHAT_TEMPLATE = r"""
{#- Pixtral (mistral-common v3, tekken) for llama.cpp's mtmd; written by pixtral-cpp.
    Tools ([AVAILABLE_TOOLS]) are refused. Each user turn is "[INST]" ~ text ~ "[/INST]": with these two
    markers llama.cpp's non-Jinja route takes this template for its built-in mistral-v3-tekken format. -#}
{%- set media = "<__media__>" -%}
{%- set ns = namespace(system=[], turns=[], role=none, chunks=[], users=0, pending="", image="") -%}
{#- Pass 1: merge each run of same-role messages into one turn of text and image chunks. -#}
{%- for message in messages + [{"role": "__end__"}] -%}
  {%- if message.role != ns.role -%}
    {%- if ns.role == "system" and ns.chunks -%}
      {%- set ns.system = ns.system + [ns.chunks[0].text] -%}
    {%- elif ns.role in ["user", "assistant"] -%}
      {%- set ns.turns = ns.turns + [{"role": ns.role, "chunks": ns.chunks}] -%}
    {%- endif -%}
    {%- set ns.role = message.role -%}
    {%- set ns.chunks = [] -%}
  {%- endif -%}
  {%- if message.role not in ["system", "user", "assistant", "__end__"] -%}
    {{- raise_exception("no role '" ~ message.role ~ "' in Pixtral's chat (system, user, assistant)") -}}
  {%- elif message.role == "assistant" and message.tool_calls -%}
    {{- raise_exception("tool calls are not supported by Pixtral's chat format") -}}
  {%- endif -%}
  {%- set content = message.content if message.content is defined and message.content is not none else "" -%}
  {%- for part in ([{"type": "text", "text": content}] if content is string else content) -%}
    {%- set ns.image = part.text if part.type == "media_marker" else media -%}
    {%- if part.type in ["image_url", "image", "media_marker"] -%}
      {%- set pieces = ["", "_>"] -%}  {#- an image part reads as text holding one marker -#}
    {%- elif part.type == "text" -%}
      {#- A media marker inside text is an image: mtmd's "<__media__>" (MTMDChatHandler) or llama-server's
          "<__media_" ~ 32 letters or digits ~ "__>" (it hands the template images as markers in text). -#}
      {%- set pieces = part.text.split("<__media_") -%}
    {%- else -%}
      {{- raise_exception("unsupported content part type '" ~ part.type ~ "'; use text or image_url") -}}
    {%- endif -%}
    {%- set ns.pending = pieces[0] -%}
    {%- for piece in pieces[1:] + [none] -%}
      {%- if piece is none -%}
        {%- set marker = {"text": "", "after": ""} -%}  {#- the end of the part: flush its text -#}
      {%- elif piece.startswith("_>") -%}
        {%- set marker = {"text": ns.image, "after": piece.split("_>", 1)[1]} -%}
      {%- elif "__>" in piece -%}
        {%- set halves = piece.split("__>", 1) -%}
        {%- set marker = {"text": "<__media_" ~ halves[0] ~ "__>", "after": halves[1]} -%}
      {%- else -%}
        {%- set marker = none -%}
      {%- endif -%}
      {%- if marker is none -%}
        {%- set ns.pending = ns.pending ~ "<__media_" ~ piece -%}
      {%- else -%}
        {%- if ns.pending and ns.chunks and ns.chunks[-1].type == "text" -%}
          {%- set joined = ns.chunks[-1].text ~ "\n\n" ~ ns.pending -%}
          {%- set ns.chunks = ns.chunks[:-1] + [{"type": "text", "text": joined}] -%}
        {%- elif ns.pending -%}
          {%- set ns.chunks = ns.chunks + [{"type": "text", "text": ns.pending}] -%}
        {%- endif -%}
        {%- if marker.text and message.role != "user" -%}
          {{- raise_exception("only user messages can hold images, not " ~ message.role ~ " messages") -}}
        {%- elif marker.text -%}
          {%- set ns.chunks = ns.chunks + [{"type": "image", "text": marker.text}] -%}
        {%- endif -%}
        {%- set ns.pending = marker.after -%}
      {%- endif -%}
    {%- endfor -%}
  {%- endfor -%}
{%- endfor -%}
{%- if not ns.turns or ns.turns[0].role != "user" -%}
  {%- set ns.turns = [{"role": "user", "chunks": []}] + ns.turns -%}
{%- endif -%}
{%- set last_user = (ns.turns | selectattr("role", "equalto", "user") | list | length) - 1 -%}
{%- set system_prompt = ns.system | join("\n\n") -%}
{#- Pass 2: emit the turns. bos_token is empty under MTMDChatHandler (mtmd adds BOS) and the BOS text
    under the text-only Jinja2ChatFormatter, which then adds none. -#}
{{- bos_token | default("") -}}
{%- for turn in ns.turns -%}
  {%- if turn.role == "user" -%}
    {%- set chunks = turn.chunks -%}
    {%- if chunks | length == 2 and chunks[0].type == "text" and chunks[1].type == "image" -%}
      {%- set chunks = [chunks[1], chunks[0]] -%}
    {%- endif -%}
    {{- "[INST]" -}}
    {%- if ns.users == last_user and system_prompt -%}
      {{- system_prompt ~ "\n\n" -}}
    {%- endif -%}
    {%- for chunk in chunks -%}
      {{- chunk.text -}}
    {%- endfor -%}
    {{- "[/INST]" -}}
    {%- set ns.users = ns.users + 1 -%}
  {%- else -%}
    {%- if not turn.chunks -%}
      {{- raise_exception("an assistant message needs text content") -}}
    {%- endif -%}
    {{- turn.chunks[0].text.rstrip(" ") ~ "</s>" -}}
  {%- endif -%}
{%- endfor -%}
"""


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What MTMDChatHandler passes to the template: image_url parts become media-marker text parts."""
    converted = []
    for message in messages:
        message_dict = dict(message)
        content = message_dict.get("content")
        if isinstance(content, list):
            message_dict["content"] = [
                {"type": "text", "text": MEDIA_MARKER}
                if isinstance(part, Mapping) and part.get("type") == "image_url" else part
                for part in content
            ]
        converted.append(message_dict)
    return converted


def render_chat(messages: Sequence[Mapping[str, Any]], template: str = PIXTRAL_CHAT_TEMPLATE) -> str:
    """Render OpenAI-style messages exactly as llama-cpp-python 0.3.36's MTMDChatHandler would.

    Raises jinja2.TemplateError for conversations the format cannot express (tool roles, images in
    assistant messages, empty assistant turns).
    """
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    return environment.from_string(template).render(
        messages=_template_messages(messages),
        add_generation_prompt=True,
        # The handler detokenizes ids 1 and 2 without special rendering, which yields empty strings.
        bos_token="",
        eos_token="",
        raise_exception=raise_exception,
    )
