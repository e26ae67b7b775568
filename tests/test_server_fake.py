"""The server's routes, guard, model manager and run registry on FakeDriver engines (in-process
uvicorn on a free loopback port: real HTTP, no model)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from types import SimpleNamespace

import httpx
import pytest

from server_helpers import fake_manager, never_ends, serving

from pie_local.server.config import ServerConfig, parse_duration, parse_size
from pie_local.server.errors import APIError

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}


def config(**kw) -> ServerConfig:
    return ServerConfig(**kw)


async def wait_idle(client: httpx.AsyncClient, timeout: float = 5.0) -> dict:
    """Poll the stats until no page is held by any context (cached prefix pages may stay)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = (await client.get("/v1/pie/stats")).json()
        if all(m["stats"]["pages_used"] == 0 for m in stats["models"]):
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"pages still held: {stats}"
        await asyncio.sleep(0.02)


def test_durations_and_sizes():
    assert parse_duration("10m") == 600 and parse_duration("30s") == 30 and parse_duration("1.5h") == 5400
    assert parse_duration("0") == 0 and parse_duration("-1") is None and parse_duration("never") is None
    assert parse_size("8MiB") == 8 << 20 and parse_size("512k") == 512 << 10 and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_duration("soon")


async def test_chat_completion_streamed_and_not():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "fake"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] > 0
        text = choice["message"]["content"]

        r = await c.post("/v1/chat/completions",
                         json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
        assert streamed == text  # greedy: the same reply
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert [ch["choices"][0]["finish_reason"] for ch in chunks[:-1]][-1] == "length"
        await wait_idle(c)


async def test_n_forks_share_the_prompt_and_seeds_differ():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        long_prompt = "x" * 200
        r = await c.post("/v1/completions", json={"model": "fake", "prompt": long_prompt, "max_tokens": 8, "n": 3,
                                                  "temperature": 1.0, "seed": 7})
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
        assert len({ch["text"] for ch in body["choices"]}) == 3  # one seed, three different streams
        assert body["usage"]["completion_tokens"] == 24
        stats = (await c.get("/v1/pie/stats")).json()["models"][0]["stats"]
        # the 201-token prompt was computed once, not three times: at most a partial page per fork extra
        assert stats["tokens_total"] < 201 + 3 * (4 + 8)
        again = (await c.post("/v1/completions", json={"model": "fake", "prompt": long_prompt, "max_tokens": 8,
                                                       "n": 3, "temperature": 1.0, "seed": 7})).json()
        assert [ch["text"] for ch in again["choices"]] == [ch["text"] for ch in body["choices"]]


async def test_completion_logprobs_and_echo_and_token_prompts():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        body = (await c.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 4,
                                                      "temperature": 0, "logprobs": 0})).json()
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == 4 and all(x <= 0 for x in lp["token_logprobs"])
        assert "".join(lp["tokens"]) == body["choices"][0]["text"] and lp["text_offset"][0] == 0
        echoed = (await c.post("/v1/completions", json={"model": "fake", "prompt": "abc", "max_tokens": 4,
                                                        "temperature": 0, "echo": True})).json()
        assert echoed["choices"][0]["text"] == "abc" + body["choices"][0]["text"]
        ids = (await c.post("/v1/completions", json={"model": "fake", "prompt": [1, 5 + 97, 5 + 98, 5 + 99],
                                                     "max_tokens": 4, "temperature": 0})).json()
        assert ids["choices"][0]["text"] == body["choices"][0]["text"]  # <bos>abc as token ids


@pytest.mark.parametrize("body, status, param", [
    ({**CHAT, "model": "nope"}, 404, "model"),
    ({**CHAT, "n": 0}, 400, "n"),
    ({**CHAT, "n": 1000}, 400, "n"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "temperature": 3}, 400, "temperature"),
    ({**CHAT, "top_p": 0}, 400, "top_p"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({**CHAT, "stop": 3}, 400, "stop"),
    ({**CHAT, "top_logprobs": 3}, 400, "top_logprobs"),
    ({**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, 400,
     "response_format.json_schema.schema"),
    ({**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({**CHAT, "max_tokens": 100_000}, 400, "messages"),  # longer than the context: never truncated
    ({"messages": CHAT["messages"]}, 400, "model"),
])
async def test_bad_requests_are_named_errors(body, status, param):
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and error["type"]
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200  # alive afterwards
        await wait_idle(c)


async def test_prompts_past_the_context_are_refused_never_truncated():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        # past the KV pool (1024 tokens here), and past the model's trained context (4096)
        for prompt, max_tokens in (("x" * 1000, 100), ("x" * 5000, 1)):
            r = await c.post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": max_tokens})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            assert r.json()["error"]["param"] == "prompt"
        await wait_idle(c)


async def test_malformed_and_oversized_bodies_and_unknown_routes():
    cfg = config(max_body_bytes=1000)
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.post("/v1/chat/completions", content=b"[1, 2]")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await c.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        async def chunked():  # no Content-Length: cut while reading
            for _ in range(10):
                yield b" " * 200

        r = await c.post("/v1/chat/completions", content=chunked())
        assert r.status_code == 413
        r = await c.get("/v1/nothing")
        assert r.status_code == 404 and "routes" in r.json()["error"]["message"]
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_api_key_is_required_when_set():
    cfg = config(api_key="s3cret")
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await c.get("/health")).status_code == 200  # liveness needs no key


async def test_kv_exhaustion_is_503_with_retry_after():
    cfg = config()
    # 16 pages of 4 tokens: one request fits, two at once do not
    manager = fake_manager(cfg, n_pages=16, delay=0.01, next_token=never_ends)
    async with serving(cfg, manager) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        req = {"model": "fake", "prompt": "y" * 30, "max_tokens": 30, "temperature": 0}
        first = asyncio.ensure_future(c.post("/v1/completions", json=req))
        while not any(m["stats"]["pages_used"] for m in (await c.get("/v1/pie/stats")).json()["models"]):
            await asyncio.sleep(0.01)
        r = await c.post("/v1/completions", json={**req, "prompt": "z" * 30})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "out_of_kv_pages"
        assert (await first).status_code == 200
        await wait_idle(c)


async def test_client_dropping_mid_stream_cancels_and_frees_pages():
    cfg = config()
    manager = fake_manager(cfg, delay=0.01, next_token=never_ends)
    async with serving(cfg, manager) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        req = {"model": "fake", "prompt": "q" * 40, "max_tokens": 900, "stream": True, "n": 2}
        async with c.stream("POST", "/v1/completions", json=req) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    break  # leaving the block closes the connection
        stats = await wait_idle(c)
        assert stats["models"][0]["active"] == 0
        await asyncio.sleep(0.1)  # the pass in flight when the client left may still end
        tokens = (await c.get("/v1/pie/stats")).json()["models"][0]["stats"]["tokens_total"]
        await asyncio.sleep(0.3)
        assert (await c.get("/v1/pie/stats")).json()["models"][0]["stats"]["tokens_total"] == tokens  # stopped


async def test_client_dropping_a_non_streamed_request_cancels_it():
    cfg = config()
    manager = fake_manager(cfg, delay=0.01, next_token=never_ends)
    async with serving(cfg, manager) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        req = {"model": "fake", "prompt": "q" * 40, "max_tokens": 900}
        with pytest.raises(httpx.ReadTimeout):
            r = await c.post("/v1/completions", json=req, timeout=0.5)
            pytest.fail(f"answered in time: {r.status_code} {r.text[:300]}")
        stats = await wait_idle(c)
        assert stats["models"][0]["stats"]["tokens_total"] < 900


async def test_models_load_on_use_unload_after_keep_alive_and_evict_past_max_models():
    cfg = config(keep_alive_s=0.3, max_models=1)
    manager = fake_manager(cfg, models=("a", "b"))
    async with serving(cfg, manager) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/v1/pie/stats")).json()["models"] == []
        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "a"})).status_code == 200
        assert [m["name"] for m in (await c.get("/v1/pie/stats")).json()["models"]] == ["a"]
        assert (await c.post("/v1/chat/completions", json={**CHAT, "model": "b"})).status_code == 200
        assert [m["name"] for m in (await c.get("/v1/pie/stats")).json()["models"]] == ["b"]  # a made room
        models = {m["id"]: m["loaded"] for m in (await c.get("/v1/models")).json()["data"]}
        assert models["b"] is True
        assert (await c.get("/v1/models/b")).json()["loaded"] is True
        r = await c.get("/v1/models/zzz")
        assert r.status_code == 404 and "pie-local pull zzz" in r.json()["error"]["message"]
        await asyncio.sleep(0.6)
        assert (await c.get("/v1/pie/stats")).json()["models"] == []  # keep-alive ran out


async def test_a_busy_model_is_never_evicted():
    cfg = config(max_models=1)
    manager = fake_manager(cfg, models=("a", "b"), delay=0.01, next_token=never_ends)
    async with serving(cfg, manager) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        first = asyncio.ensure_future(c.post("/v1/completions", json={"model": "a", "prompt": "p", "max_tokens": 200}))
        while not (await c.get("/v1/pie/stats")).json()["models"]:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/completions", json={"model": "b", "prompt": "p", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_slots_busy"
        assert r.headers["retry-after"]
        assert (await first).status_code == 200


# ---- inferlets over the network ----------------------------------------------------------------------


async def events_of(c: httpx.AsyncClient, run_id: str, after: int = 0) -> list[dict]:
    async with c.stream("GET", f"/v1/pie/runs/{run_id}/events", params={"after": after}) as r:
        assert r.status_code == 200
        out = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
        return out


async def test_launch_stream_list_and_get_a_run():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/pie/runs",
                         json={"inferlet": "text-completion", "args": {"prompt": "hi", "max_tokens": 5}})
        assert r.status_code == 201, r.text
        run = r.json()
        events = await events_of(c, run["id"])
        assert events[-1]["type"] == "result" and events[-1]["state"] == "done"
        assert "".join(e["text"] for e in events if e["type"] == "text") == events[-1]["result"]
        assert (await events_of(c, run["id"], after=len(events) - 1)) == events[-1:]  # resume from an index
        listed = (await c.get("/v1/pie/runs")).json()["data"]
        assert [x["id"] for x in listed] == [run["id"]] and listed[0]["state"] == "done" and listed[0]["tokens"] > 0
        one = (await c.get(f"/v1/pie/runs/{run['id']}")).json()
        assert one["result"] == events[-1]["result"]
        names = [x["name"] for x in (await c.get("/v1/pie/inferlets")).json()["data"]]
        assert "text-completion" in names and "chat" in names


async def test_run_errors_are_named():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/pie/runs", json={"inferlet": "no-such-thing"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "inferlet"
        r = await c.post("/v1/pie/runs", json={"inferlet": "text-completion", "args": {"colour": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "args"
        assert (await c.get("/v1/pie/runs/run-99")).status_code == 404
        assert (await c.get("/v1/pie/stats")).json()["models"][0]["active"] == 0  # failed launches gave it back


async def test_message_round_trip_and_cancel():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        run = (await c.post("/v1/pie/runs", json={"inferlet": "chat", "args": {"max_tokens": 3}})).json()
        assert (await c.post(f"/v1/pie/runs/{run['id']}/messages", json={"data": "hello"})).status_code == 200
        async with c.stream("GET", f"/v1/pie/runs/{run['id']}/events") as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "message":
                    assert json.loads(line[6:])["data"]["event"] == "turn_end"  # it answered our message
                    break
        r = await c.post(f"/v1/pie/runs/{run['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert (await events_of(c, run["id"]))[-1]["type"] == "error"
        r = await c.post(f"/v1/pie/runs/{run['id']}/messages", json={"data": "late"})
        assert r.status_code == 409
        await wait_idle(c)


async def test_inferlet_files_only_for_local_clients(tmp_path):
    path = tmp_path / "shout.py"
    path.write_text(textwrap.dedent('''
        NAME = "shout"
        async def main(rt, args):
            return "HELLO"
    '''))
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        run = (await c.post("/v1/pie/runs", json={"inferlet": str(path)})).json()
        assert (await events_of(c, run["id"]))[-1]["result"] == "HELLO"
    cfg = config(inferlet_files=False)
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/v1/pie/runs", json={"inferlet": str(path)})
        assert r.status_code == 403 and r.json()["error"]["code"] == "inferlet_files_disabled"


async def test_remote_clients_cannot_reach_the_servers_files(monkeypatch):
    from starlette.requests import Request

    from pie_local.server import programs

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode()}

    for body, code in [({"inferlet": "/tmp/x.py"}, "inferlet_file_forbidden"),
                       ({"inferlet": "react-agent", "args": {"prompt": "hi"}}, "inferlet_file_access_forbidden")]:
        scope = {"type": "http", "method": "POST", "path": "/v1/pie/runs", "headers": [],
                 "state": {"local": False}, "app": SimpleNamespace(state=SimpleNamespace(config=ServerConfig()))}
        with pytest.raises(APIError) as err:
            await programs.launch(Request(scope, receive))
        assert err.value.status == 403 and err.value.code == code


def test_remote_clients_are_not_local():
    from pie_local.server.app import Guard

    seen = {}

    async def app(scope, receive, send):
        seen["local"] = scope["state"]["local"]

    async def call(client):
        await Guard(app, ServerConfig())({"type": "http", "path": "/", "headers": [], "client": client}, None, None)

    asyncio.run(call(("192.168.1.5", 1234)))
    assert seen["local"] is False
    asyncio.run(call(("127.0.0.1", 1234)))
    assert seen["local"] is True


async def test_python_client_mirrors_the_engine_calls():
    from pie_local import Client
    from pie_local.runtime import InferletCancelled

    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url:
        async with Client(url) as client:
            assert await client.health()
            text = await client.run("text-completion", {"prompt": "hi", "max_tokens": 5})
            pieces = [p async for p in client.stream("text-completion", {"prompt": "hi", "max_tokens": 5})]
            assert "".join(pieces) == text
            h = await client.launch("chat", {"max_tokens": 3})
            await h.send("hello")
            async for msg in h.messages():
                if msg.kind == "data":
                    assert msg.data["event"] == "turn_end"
                    break
            await h.send(None)  # ends the chat: its result is the conversation
            result = await h.result()
            assert [m["role"] for m in result] == ["user", "assistant"] and h.state == "done"
            h2 = await client.launch("chat", {})
            await h2.cancel()
            with pytest.raises(InferletCancelled):
                await h2.result()
            assert {r["id"] for r in await client.inferlets()} >= {h.id, h2.id}
            assert (await client.stats())["models"][0]["name"] == "fake"
