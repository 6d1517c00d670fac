"""OpenAI's Responses API (/v1/responses) against a real server process, through the official client:
plain, streamed (the SDK's own event types), images, structured output, usage, follow-ups."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel, Field

from pixtral_cpp.conversation import Image, Message
from pixtral_cpp.results import GenerationStats
from pixtral_cpp.server import ServerConfig
from pixtral_cpp.server.protocol import RequestError
from pixtral_cpp.server.responses_api import ResponsesFormat, ResponseStore, parse_responses_request
from tests.served import data_url, png, serving

KEY = "responses-key"
MODEL = "pixtral-12b"


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    text, mmproj = converted("F16", "F16")
    log = tmp_path_factory.mktemp("responses-log") / "server.log"
    with serving(text, mmproj, log, "--ctx", "1024", "--max-image-size", "64", key=KEY) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int = 5) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)


def _refused(server: str, body: dict[str, Any], *words: str) -> dict[str, Any]:
    response = httpx.post(f"{server}/v1/responses", json={"model": MODEL, **body}, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for word in words:
        assert word in error["message"], error
    return error


def test_plain_response_is_the_chat_answer_with_responses_usage(client):
    response = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=5, temperature=0)
    chat = _chat(client, [{"role": "user", "content": "Hello there"}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete") and response.model == MODEL
    assert response.output_text == chat.choices[0].message.content
    (item,) = response.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.max_output_tokens == 5 and response.temperature == 0


def test_instructions_and_message_items_are_the_chat_conversation(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": "First"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Yes."}]},
             {"type": "message", "role": "user", "content": "Second"}]
    response = client.responses.create(model=MODEL, instructions="Be brief.", input=items, max_output_tokens=5,
                                       temperature=0)
    chat = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First"},
                          {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Second"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == "Be brief."
    developer = client.responses.create(model=MODEL, input=[{"role": "developer", "content": "Be brief."},
                                                            {"role": "user", "content": "Second"}],
                                        max_output_tokens=5, temperature=0)
    as_instructions = client.responses.create(model=MODEL, instructions="Be brief.", input="Second",
                                              max_output_tokens=5, temperature=0)
    assert developer.output_text == as_instructions.output_text


EVENT_ORDER = [ResponseCreatedEvent, ResponseInProgressEvent, ResponseOutputItemAddedEvent,
               ResponseContentPartAddedEvent]
CLOSING = [ResponseTextDoneEvent, ResponseContentPartDoneEvent, ResponseOutputItemDoneEvent]


def test_streaming_sends_openais_events_in_order(client):
    expected = client.responses.create(model=MODEL, input="Stream this", max_output_tokens=6, temperature=0)
    events = list(client.responses.create(model=MODEL, input="Stream this", max_output_tokens=6, temperature=0,
                                          stream=True))
    kinds = [type(event) for event in events]
    assert kinds[:4] == EVENT_ORDER and kinds[-4:-1] == CLOSING
    assert kinds[-1] in (ResponseCompletedEvent, ResponseIncompleteEvent)
    deltas = events[4:-4]
    assert deltas and all(isinstance(event, ResponseTextDeltaEvent) for event in deltas)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in deltas)
    assert text == expected.output_text == events[-4].text == events[-1].response.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].response.usage.output_tokens == expected.usage.output_tokens
    assert {event.item_id for event in deltas} == {events[2].item.id}
    # the SDK's stream helper reads the same events (its final response needs an answer that ends by itself)
    short = {"format": {"type": "json_schema", "name": "s", "schema": {"type": "string", "maxLength": 3}}}
    fields = {"model": MODEL, "input": "Stream this", "max_output_tokens": 20, "text": short, "temperature": 0}
    whole = client.responses.create(**fields)
    assert whole.status == "completed"
    with client.responses.stream(**fields) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == whole.output_text


def test_a_length_limit_makes_the_response_incomplete(client):
    long_text = {"format": {"type": "json_schema", "name": "t", "schema": {"type": "string", "minLength": 200}}}
    response = client.responses.create(model=MODEL, input="Go", max_output_tokens=4, text=long_text)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4
    events = list(client.responses.create(model=MODEL, input="Go", max_output_tokens=4, text=long_text,
                                          stream=True))
    assert isinstance(events[-1], ResponseIncompleteEvent) and events[-1].response.status == "incomplete"


def test_an_image_as_input_image(client, server):
    image = {"type": "input_image", "image_url": data_url(png(32, 24)), "detail": "auto"}
    question = {"type": "input_text", "text": "What is this?"}
    with_image = client.responses.create(model=MODEL, input=[{"role": "user", "content": [image, question]}],
                                         max_output_tokens=3, temperature=0)
    without = client.responses.create(model=MODEL, input="What is this?", max_output_tokens=3, temperature=0)
    assert with_image.usage.input_tokens == without.usage.input_tokens + 2 * 3  # 2x2 patches and breaks
    remote = {**image, "image_url": "https://example.com/cat.png"}
    _refused(server, {"input": [{"role": "user", "content": [remote, question]}]}, "remote image URLs")
    _refused(server, {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
             "file_id")


class Caption(BaseModel):
    caption: str = Field(max_length=12)


def test_structured_output_through_text_format(client):
    parsed = client.responses.parse(model=MODEL, input="Describe as JSON.", text_format=Caption,
                                    max_output_tokens=60, temperature=0.8)
    assert isinstance(parsed.output_parsed, Caption)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    raw = client.responses.create(model=MODEL, input="A number as JSON.", max_output_tokens=30, temperature=0.5,
                                  text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    jsonschema.validate(json.loads(raw.output_text), schema)
    assert raw.text.format.type == "json_schema"


def test_previous_response_id_continues_a_stored_conversation(client, server):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    chat = _chat(client, [{"role": "user", "content": "My name is Ada."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "What is my name?"}], max_tokens=4)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    unstored = client.responses.create(model=MODEL, input="Forget me", max_output_tokens=2, store=False)
    for missing in (unstored.id, "resp_never"):
        error = _refused(server, {"input": "And?", "previous_response_id": missing}, "previous response", missing)
        assert error["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(("body", "words"), [
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "function_call_output"),
    ({"input": ""}, "input must be"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens must be between 1"),
    ({"input": [{"role": "tool", "content": "x"}]}, "role must be one of"),
])
def test_what_pixtral_does_not_do_is_refused_naming_the_field(server, body, words):
    _refused(server, body, words)


# ---------------------------------------------------------------------------------------------------
# Without a server: the store's bounds and the failure events


def _turns(pixels: int) -> list[Message]:
    return [Message.user(Image(np.zeros((pixels, 1, 3), np.uint8)), "q"), Message.assistant("a")]


def test_the_store_keeps_the_newest_answers_within_count_and_image_bytes():
    store = ResponseStore(max_responses=2, max_image_bytes=3 * 100)
    for name in ("a", "b", "c"):
        store.keep(name, _turns(10), {"id": name})
    assert store.response("a") is None and store.response("c") == {"id": "c"}
    with pytest.raises(RequestError, match="not kept"):
        store.turns("a")
    store.keep("big", _turns(91), {"id": "big"})  # 273 bytes: with c's 30, over the budget
    assert store.response("c") is None and store.response("big") is not None
    store.keep("huge", _turns(200), {"id": "huge"})  # over the whole budget: not kept, nothing dropped
    assert store.response("huge") is None and store.response("big") is not None


def test_a_failure_after_the_status_is_an_error_event_then_response_failed():
    request = parse_responses_request(json.dumps({"input": "hi"}).encode(), ServerConfig(), ResponseStore(1, 1))
    form = ResponsesFormat(request, MODEL, ResponseStore(1, 1))
    opened = form.opening()
    body = RequestError(503, "the server is shutting down", type="server_error", code="server_shutting_down").body()
    events = [json.loads(raw.decode().split("data: ", 1)[1]) for raw in [*opened, *form.failure(body)]]
    error, failed = ResponseErrorEvent.model_validate(events[-2]), ResponseFailedEvent.model_validate(events[-1])
    assert error.message == "the server is shutting down" and error.code == "server_shutting_down"
    assert failed.response.status == "failed" and failed.response.error.message == error.message
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_every_event_and_response_validates_against_the_sdks_own_types(finish):
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    body = {"input": "hi", "instructions": "Be brief.", "max_output_tokens": 9, "metadata": {"k": "v"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "string"}}}}
    request = parse_responses_request(json.dumps(body).encode(), ServerConfig(), ResponseStore(1, 1))
    form = ResponsesFormat(request, MODEL, ResponseStore(1, 1))
    stats = GenerationStats(prompt_tokens=12, reused_tokens=4, image_tokens=0, images_encoded=0,
                            image_encode_seconds=0.0, prompt_seconds=0.1, generated_tokens=2,
                            generation_seconds=0.1, finish_reason=finish)
    raw = [*form.opening(), *form.delta('"a'), *form.delta('b"'), *form.closing('"ab"', stats)]
    events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(item.decode().split("data: ", 1)[1]))
              for item in raw]
    assert [event.type for event in events][-1] == ("response.completed" if finish == "stop"
                                                    else "response.incomplete")
    final = Response.model_validate(form.completion('"ab"', stats))
    assert final.output_text == '"ab"' and final.usage.input_tokens_details.cached_tokens == 4
    assert final.text.format.type == "json_schema" and final.metadata == {"k": "v"}
