"""`pie-local serve` as a subprocess on the starter model, judged by the official `openai` client
and by raw HTTP: completions, streaming, forks, logprobs, constrained JSON, forced tool calls,
prefix-cache reporting, errors, disconnects and inferlet runs. One server for the module."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from server_helpers import serve_process

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.real_driver, pytest.mark.slow]

try:
    from pie_local.driver import Driver  # noqa: F401
except Exception:  # noqa: BLE001
    pytestmark.append(pytest.mark.skip(reason="the native driver is not built"))

MODEL = "starter-local"
KEY = "test-key"
USER = [{"role": "user", "content": "Name a colour."}]
ONE_TOKEN = {"model": MODEL, "messages": USER, "max_tokens": 1}
# Starter embeddings against llama.cpp's mean pooling (Q4_K_M), both sides with repacked weights
# (the server's default; llama.cpp's extra buffer types). With ggml's kernels on both sides the unit
# vectors differed by 6.0e-8 (one float32 ulp near 1) for inputs of 3 and 23 tokens. The server's
# defaults also run the driver's own kernels (own_kernels): q8_0/q5_0 products summing the same
# integer dots in another float order (alone: measured max |diff| 4.5e-3) and attention summing V
# in float32 where ggml sums in fp16 (with both: 1.1e-2); the 18 layers amplify that rounding.
# 3e-2 leaves room for other inputs; a wrong pooling, token or norm is off by more than 0.1. The
# exact comparison with ggml's kernels pinned: tests/test_embeddings_real.py.
EMBED_TOL = 3e-2


@pytest.fixture(scope="module")
def server(starter_gguf, tmp_path_factory):
    """The server, with the starter GGUF registered in place (no copy) in its own data directory."""
    home = tmp_path_factory.mktemp("serve_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIE_LOCAL_HOME", str(home))
        from pie_local.models import store

        store.add(starter_gguf, name=MODEL)
    with serve_process(home, "--model", MODEL, "--threads", "2", "--api-key", KEY, "--max-body", "256KiB",
                       "--pages", "256") as (record, proc):
        yield record
    assert not (home / "server.json").exists()  # removed on exit


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


def idle_pages(http: httpx.Client, timeout: float = 30.0) -> dict:
    """Wait until no context holds a KV page; returns the model's stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = http.get("/v1/pie/stats").json()["models"][0]["stats"]
        if stats["pages_used"] == 0:
            return stats
        assert time.monotonic() < deadline, f"pages still held: {stats}"
        time.sleep(0.05)


# ---- the OpenAI API through the official client ---------------------------------------------------------


def test_models_lists_the_loaded_model(client):
    models = {m.id: m for m in client.models.list().data}
    assert MODEL in models and models[MODEL].model_extra["loaded"] is True


def test_chat_streamed_and_not_agree(client, http):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    idle_pages(http)


def test_completion_streamed_and_not_agree(client):
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == reply.choices[0].text
    assert reply.choices[0].text and reply.usage.completion_tokens == 8


def test_n_three_choices_from_one_prompt(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=1.0, seed=3, n=3)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # three seeds, not one answer thrice
    assert 3 <= reply.usage.completion_tokens <= 3 * 8  # summed over the choices


def test_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == reply.choices[0].message.content


def test_json_schema_output_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=48,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                                "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}}]


def test_forced_tool_call_has_parsed_arguments(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, max_tokens=40, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "unit"} and args["unit"] in ("C", "F")

    stream = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, max_tokens=40, temperature=0,
                                            tool_choice="required", stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    streamed = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    assert deltas[-1].finish_reason == "tool_calls"
    assert streamed[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in streamed)) == args  # greedy: the same call


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(client, starter_gguf):
    from pie_local.models.chat_template import ChatTemplate
    from pie_local.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(starter_gguf)
    template = ChatTemplate.for_model(starter_gguf, tokenizer=tok)
    questions = ["When was the bridge built?", "Who designed the town hall?"]

    def chat(system: str, question: str) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]

    def shared_tokens(system: str) -> int:
        a, b = (tok.encode(template.render(chat(system, q))) for q in questions)
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    # The cache works in 32-token pages: pad the system prompt until the prefix the two requests
    # share ends on a page boundary, so every token of it can be served from the cache.
    system = "You are a careful assistant for the city archive. " + " ".join(
        f"Rule {i}: cite the record number of every document you mention." for i in range(40))
    for _ in range(64):
        if shared_tokens(system) % 32 == 0:
            break
        system += " Thank you."
    else:
        pytest.fail("could not align the shared prefix to a page")
    n_system = len(tok.encode(system))
    first, second = (client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                                    messages=chat(system, q)) for q in questions)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= n_system > 400
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_errors_reach_the_openai_client(client):
    with pytest.raises(openai.NotFoundError, match="pie-local pull"):
        client.chat.completions.create(model="qwen2.5-0.5b", messages=USER)
    with pytest.raises(openai.BadRequestError, match="context") as err:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_embeddings_through_the_openai_client(client, http, starter_gguf):
    """The client asks for base64 and decodes it; float gives the same numbers. The vectors are the
    starter model's mean-pooled final hidden states, as llama.cpp pools them (its own mean pooling
    through llama_get_embeddings_seq), unit length. Tolerance EMBED_TOL (measured; the reason is beside it)."""
    import numpy as np
    from llama_ref import LlamaRef

    texts = ["The cat",  # 3 tokens, and 23 below: see EMBED_TOL
             "In a hole in the ground there lived a hobbit, not a nasty dirty wet hole filled with worms.",
             "The cat"]
    reply = client.embeddings.create(model=MODEL, input=texts)
    vectors = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert [d.index for d in reply.data] == [0, 1, 2] and vectors.shape == (3, 640)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1], atol=0.01)
    floats = client.embeddings.create(model=MODEL, input=texts[1], encoding_format="float")
    assert np.array_equal(np.array(floats.data[0].embedding, dtype=np.float32), vectors[1])

    from pie_local.bench.machine import extra_bufts_safe

    safe, why = extra_bufts_safe()
    assert safe, f"llama.cpp cannot load repacked weights here to compare: {why}"
    with LlamaRef(starter_gguf, n_ctx=256, embeddings=True, pooling=1, extra_bufts=True) as ref:
        want, counts = [], []
        for text in texts[:2]:
            ids = ref.tokenize(text)
            counts.append(len(ids))
            ref.reset()
            ref.decode(ids, range(len(ids)), [0] * len(ids))
            want.append(ref.pooled(0) / np.linalg.norm(ref.pooled(0)))
    diff = float(np.abs(vectors[:2] - np.array(want)).max())
    print(f"starter embeddings: max |diff| vs llama.cpp {diff:.3g}")
    assert diff <= EMBED_TOL
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 2 * counts[0] + counts[1]
    assert floats.usage.prompt_tokens == counts[1]

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=[])
    assert err.value.param == "input"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input=[5] * 9000)  # past the server's 8192-token KV: never cut
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=MODEL, input="a", dimensions=64)
    assert err.value.code == "unsupported_parameter"
    idle_pages(http)


# ---- raw HTTP: bad input, then the server is alive with its pages back ---------------------------------


@pytest.mark.parametrize("send, status, code", [
    (dict(content=b'{"model": "x", "messages": ['), 400, "invalid_json"),
    (dict(json={"model": MODEL, "messages": "hi"}), 400, "invalid_type"),
    (dict(json={"model": MODEL, "messages": USER, "n": 99}), 400, "invalid_value"),
    (dict(json={"model": MODEL, "messages": USER, "max_tokens": -1}), 400, "invalid_value"),
    (dict(json={"model": "no-such-model", "messages": USER}), 404, "model_not_found"),
    (dict(json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 300_000}]}), 413, "body_too_large"),
])
def test_bad_input_is_a_clear_error(http, send, status, code):
    r = http.post("/v1/chat/completions", **send)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=ONE_TOKEN).status_code == 200
    idle_pages(http)


def test_missing_key_is_401(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_client_dropping_mid_stream_frees_its_pages(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 4000, "temperature": 1.0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i > 8:
                break
    before = idle_pages(http)["tokens_total"]
    time.sleep(1.0)
    assert http.get("/v1/pie/stats").json()["models"][0]["stats"]["tokens_total"] <= before + 2  # stopped
    assert http.post("/v1/chat/completions", json=ONE_TOKEN).status_code == 200


# ---- inferlets over the network -----------------------------------------------------------------------


def test_inferlet_runs_over_the_network(http):
    run = http.post("/v1/pie/runs", json={"inferlet": "text-completion", "model": MODEL,
                                          "args": {"prompt": "The capital of France is", "max_tokens": 6}}).json()
    with http.stream("GET", f"/v1/pie/runs/{run['id']}/events") as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "result" and events[-1]["result"]
    assert "".join(e["text"] for e in events if e["type"] == "text") == events[-1]["result"]

    chat = http.post("/v1/pie/runs", json={"inferlet": "chat", "model": MODEL, "args": {"max_tokens": 4}}).json()
    assert http.post(f"/v1/pie/runs/{chat['id']}/messages", json={"data": "Hello!"}).status_code == 200
    with http.stream("GET", f"/v1/pie/runs/{chat['id']}/events") as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "message":
                break  # the reply's turn_end: the message went there and back
    listed = {x["id"]: x for x in http.get("/v1/pie/runs").json()["data"]}
    assert listed[chat["id"]]["state"] == "running" and listed[chat["id"]]["pages"] > 0
    assert listed[run["id"]]["state"] == "done" and listed[run["id"]]["tokens"] > 0
    assert http.post(f"/v1/pie/runs/{chat['id']}/cancel").json()["state"] == "cancelled"
    idle_pages(http)
