"""POST /v1/embeddings on FakeDriver engines (in-process uvicorn, real HTTP): OpenAI's request and
response shapes (string, list of strings, token ids; float and base64), usage, and bad requests as
named 400s in OpenAI's error shape, with the server alive and every page free afterwards."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from server_helpers import fake_manager, serving
from test_server_fake import config, wait_idle

URL = "/v1/embeddings"
N_EMBD = 8  # FakeDriver's width


def vector(item: dict) -> np.ndarray:
    e = item["embedding"]
    return np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e, np.float32)


async def test_shapes_encodings_and_usage():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(URL, json={"model": "fake", "input": ["abc", "de", "abc"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "fake"
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
        floats = [vector(d) for d in body["data"]]
        assert all(v.shape == (N_EMBD,) and abs(np.linalg.norm(v) - 1) < 1e-6 for v in floats)
        assert np.array_equal(floats[0], floats[2]) and not np.array_equal(floats[0], floats[1])
        # <bos> + one token per byte
        assert body["usage"] == {"prompt_tokens": 4 + 3 + 4, "total_tokens": 11}

        r = await c.post(URL, json={"model": "fake", "input": "abc", "encoding_format": "base64"})
        item = r.json()["data"][0]
        assert isinstance(item["embedding"], str) and np.array_equal(vector(item), floats[0])

        ids = [1] + [5 + b for b in b"abc"]  # the same input as token ids
        for given in (ids, [ids]):
            r = await c.post(URL, json={"model": "fake", "input": given, "dimensions": N_EMBD})
            assert r.status_code == 200 and np.array_equal(vector(r.json()["data"][0]), floats[0])
        await wait_idle(c)


@pytest.mark.parametrize("body, param, code", [
    ({"input": "a"}, "model", "missing_model"),
    ({"model": "fake"}, "input", "missing_input"),
    ({"model": "fake", "input": []}, "input", "invalid_value"),
    ({"model": "fake", "input": ""}, "input", "invalid_value"),
    ({"model": "fake", "input": ["a", ""]}, "input[1]", "invalid_value"),
    ({"model": "fake", "input": [[]]}, "input[0]", "invalid_value"),
    ({"model": "fake", "input": 5}, "input", "invalid_type"),
    ({"model": "fake", "input": {"text": "a"}}, "input", "invalid_type"),
    ({"model": "fake", "input": ["a", 5]}, "input[1]", "invalid_type"),
    ({"model": "fake", "input": [1.5, 2]}, "input[0]", "invalid_type"),
    ({"model": "fake", "input": [1, -2]}, "input", "invalid_value"),
    ({"model": "fake", "input": [1, 100_000]}, "input", "invalid_value"),  # outside the vocabulary
    ({"model": "fake", "input": ["a"] * 2049}, "input", "invalid_value"),
    ({"model": "fake", "input": "a", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
    ({"model": "fake", "input": "a", "dimensions": 4}, "dimensions", "unsupported_parameter"),
    ({"model": "fake", "input": "a", "dimensions": "8"}, "dimensions", "invalid_type"),
    ({"model": "fake", "input": "x" * 2000}, "input", "context_length_exceeded"),  # never truncated
])
async def test_bad_requests_are_named_400s(body, param, code):
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(URL, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["param"], error["code"]) == (param, code), error
        assert error["message"] and error["type"] == "invalid_request_error"
        assert (await c.post(URL, json={"model": "fake", "input": "ok"})).status_code == 200  # alive afterwards
        await wait_idle(c)


async def test_unknown_model_is_404():
    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(URL, json={"model": "nope", "input": "a"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


async def test_inputs_larger_than_the_free_kv_are_503():
    cfg = config()
    # 16 pages of 4 tokens: 70 tokens of input need 18
    async with serving(cfg, fake_manager(cfg, n_pages=16)) as url, httpx.AsyncClient(base_url=url) as c:
        r = await c.post(URL, json={"model": "fake", "input": ["y" * 34, "z" * 34]})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "out_of_kv_pages"
        assert (await c.post(URL, json={"model": "fake", "input": "y" * 34})).status_code == 200
        await wait_idle(c)


async def test_python_client_embeds_through_the_route():
    from pie_local import Client

    cfg = config()
    async with serving(cfg, fake_manager(cfg)) as url, Client(url) as client:
        vectors = await client.embed_many(["abc", [1, 5 + ord("a")]], model="fake")
        async with httpx.AsyncClient(base_url=url) as c:
            direct = (await c.post(URL, json={"model": "fake", "input": "abc"})).json()["data"][0]["embedding"]
    assert len(vectors) == 2 and vectors[0] == direct and len(vectors[1]) == N_EMBD
