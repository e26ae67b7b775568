"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Each handler checks the request (schema.py), borrows the model's engine from the manager,
builds a `Job` (generation.py) and formats its choices as OpenAI does, streamed over SSE
(``data: {...}`` chunks, then ``data: [DONE]``) or as one JSON body.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pie_local.server.embeddings import embed_request
from pie_local.server.errors import APIError, invalid
from pie_local.server.generation import Choice, Delta, Finished, Job, finite
from pie_local.server.schema import (ChatRequest, CompletionRequest, parse_chat, parse_completion, parse_embedding,
                                    read_json)
from pie_local.server.streaming import sse_response, until_disconnect
from pie_local.server.tool_calls import CallSniffer, call_json, extract_calls, forced_call_constraint

# ---- /v1/models -------------------------------------------------------------------------------------


def _model_entry(name: str, created: float, loaded: bool) -> dict:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "pie-local", "loaded": loaded}


def _model_entries(request: Request) -> list[dict]:
    """Installed models (the starter model is always available) and whatever is loaded."""
    from pie_local.models import STARTER_NAME
    from pie_local.models.store import list_installed

    loaded = {m.name: m for m in request.app.state.manager.loaded()}
    entries = {m.name: _model_entry(m.name, m.added_at, m.name in loaded) for m in list_installed()}
    entries.setdefault(STARTER_NAME, _model_entry(STARTER_NAME, 0, STARTER_NAME in loaded))
    for name, m in loaded.items():
        entries.setdefault(name, _model_entry(name, m.loaded_at, True))
    return sorted(entries.values(), key=lambda e: e["id"])


async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": _model_entries(request)})


async def get_model(request: Request) -> JSONResponse:
    name = request.path_params["model"]
    for entry in _model_entries(request):
        if entry["id"] == name:
            return JSONResponse(entry)
    raise APIError(404, f"model '{name}' is not installed; pull it with `pie-local pull {name}`",
                   param="model", code="model_not_found")


# ---- shared -----------------------------------------------------------------------------------------


class _Reply:
    """The bits of a response that every chunk repeats."""

    def __init__(self, prefix: str, obj: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.object = obj
        self.model = model
        self.created = int(time.time())

    def wrap(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}


def _piece(tokenizer: Any, token_id: int) -> bytes:
    return tokenizer.piece(token_id, special=True)


def _chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float], top: list) -> dict:
    def entry(t: int, lp: float | None) -> dict:
        piece = _piece(tokenizer, t)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(piece)}

    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        item = entry(t, finite(lp))
        item["top_logprobs"] = [entry(tt, finite(tl)) for tt, tl in top[i]] if i < len(top) else []
        content.append(item)
    return {"content": content, "refusal": None}


def _completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[float], top: list,
                         offset: int) -> dict:
    tokens = [_piece(tokenizer, t).decode("utf-8", errors="replace") for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top_maps = [{_piece(tokenizer, tt).decode("utf-8", errors="replace"): finite(tl) for tt, tl in row}
                for row in top] if top else None
    return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in logprobs], "top_logprobs": top_maps,
            "text_offset": offsets}


async def _borrow(request: Request, model: str) -> Any:
    return await request.app.state.manager.acquire(model, request.state.local)


# ---- /v1/chat/completions ---------------------------------------------------------------------------


async def chat_completions(request: Request) -> Any:
    config = request.app.state.config
    req = parse_chat(await read_json(request), config.max_n)
    lease = await _borrow(request, req.model)
    manager = request.app.state.manager
    try:
        engine = lease.engine
        job, tools, forced = _chat_job(engine, req)
    except BaseException:
        manager.release(lease)
        raise
    reply = _Reply("chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion", lease.name)
    tokenizer = engine.tokenizer
    tool_format = getattr(engine.chat_template, "tool_format", "json")

    def finish() -> None:
        job.release()
        manager.release(lease)

    if req.stream:
        return sse_response(_chat_chunks(job, req, reply, tokenizer, tools, forced, tool_format), finish)
    try:
        choices = await until_disconnect(request, job.run())
        body = reply.wrap([_chat_choice(c, req, tokenizer, tools, forced, tool_format) for c in choices],
                          usage=job.usage().to_json())
    finally:
        finish()
    return JSONResponse(body)


def _chat_job(engine: Any, req: ChatRequest) -> tuple[Job, list, bool]:
    from pie_local.models.chat_template import ChatTemplateError
    from pie_local.runtime.constraints import ConstraintError

    template = engine.chat_template
    tools = req.tools if req.tool_choice != "none" else []
    forced = req.tool_choice not in ("none", "auto")
    try:
        prompt = template.render(req.messages, add_generation_prompt=True,
                                 tools=[t.to_openai() for t in tools] or None)
    except ChatTemplateError as exc:
        raise invalid("messages", str(exc)) from None
    constraint = req.response_format
    if forced:
        try:
            constraint = forced_call_constraint(tools, req.tool_choice, getattr(template, "tool_format", "json"))
        except ConstraintError as exc:
            raise invalid("tools", f"cannot constrain a call to these tools: {exc}", "invalid_schema") from None
    stop = req.stop + [s for s in template.stop_strings if s not in req.stop]
    return Job(engine, [prompt], req, stop=stop, constraint=constraint, param="messages"), tools, forced


def _chat_choice(choice: Choice, req: ChatRequest, tokenizer: Any, tools: list, forced: bool,
                 tool_format: str) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    finish = choice.finish_reason
    if tools:
        sniffer = CallSniffer(forced)
        sniffer.push(choice.text)
        calls = extract_calls(choice.text, tools, tool_format) if sniffer.state == "call" else []
        if calls:
            message["content"] = None
            message["tool_calls"] = [call_json(c) for c in calls]
            finish = "tool_calls"
    logprobs = _chat_logprobs(tokenizer, choice.token_ids, choice.logprobs, choice.top_logprobs) \
        if req.logprobs else None
    return {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}


async def _chat_chunks(job: Job, req: ChatRequest, reply: _Reply, tokenizer: Any, tools: list,
                       forced: bool, tool_format: str) -> AsyncIterator[dict]:
    usage_null = {"usage": None} if req.include_usage else {}
    for i in range(req.n):
        yield reply.wrap([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}], **usage_null)
    sniffers = {i: CallSniffer(forced) for i in range(req.n)} if tools else {}
    pending_lp: dict[int, list] = {i: [[], [], []] for i in range(req.n)}  # logprobs of held-back text
    async for event in job.events():
        if isinstance(event, Delta):
            lp = pending_lp[event.index]
            lp[0] += event.token_ids
            lp[1] += event.logprobs
            lp[2] += event.top_logprobs
            text = sniffers[event.index].push(event.text) if tools else event.text
            if text:
                logprobs = _chat_logprobs(tokenizer, *lp) if req.logprobs else None
                pending_lp[event.index] = [[], [], []]
                yield reply.wrap([{"index": event.index, "delta": {"content": text}, "logprobs": logprobs,
                                   "finish_reason": None}], **usage_null)
            continue
        choice = event.choice
        finish = choice.finish_reason
        delta: dict[str, Any] = {}
        sniffer = sniffers.get(choice.index)
        if sniffer is not None and sniffer.state != "text":
            calls = extract_calls(sniffer.held, tools, tool_format) if sniffer.state == "call" else []
            if calls:
                delta["tool_calls"] = [call_json(c, index=k) for k, c in enumerate(calls)]
                finish = "tool_calls"
            elif sniffer.held:
                delta["content"] = sniffer.held
        yield reply.wrap([{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}],
                         **usage_null)
    if req.include_usage:
        yield reply.wrap([], usage=job.usage().to_json())


# ---- /v1/completions --------------------------------------------------------------------------------


async def completions(request: Request) -> Any:
    config = request.app.state.config
    req = parse_completion(await read_json(request), config.max_n)
    manager = request.app.state.manager
    lease = await _borrow(request, req.model)
    try:
        engine = lease.engine
        job = Job(engine, req.prompts, req, stop=req.stop)
    except BaseException:
        manager.release(lease)
        raise
    reply = _Reply("cmpl", "text_completion", lease.name)
    tokenizer = engine.tokenizer
    echoes = [_prompt_text(tokenizer, p) if req.echo else "" for p in req.prompts]

    def finish() -> None:
        job.release()
        manager.release(lease)

    if req.stream:
        return sse_response(_completion_chunks(job, req, reply, tokenizer, echoes), finish)
    try:
        choices = await until_disconnect(request, job.run())
        body = reply.wrap([_completion_choice(c, req, tokenizer, echoes[c.index // req.n]) for c in choices],
                          usage=job.usage().to_json())
    finally:
        finish()
    return JSONResponse(body)


def _prompt_text(tokenizer: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


def _completion_choice(choice: Choice, req: CompletionRequest, tokenizer: Any, echo: str) -> dict:
    logprobs = _completion_logprobs(tokenizer, choice.token_ids, choice.logprobs, choice.top_logprobs,
                                    len(echo)) if req.logprobs else None
    return {"index": choice.index, "text": echo + choice.text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason}


async def _completion_chunks(job: Job, req: CompletionRequest, reply: _Reply, tokenizer: Any,
                             echoes: list[str]) -> AsyncIterator[dict]:
    usage_null = {"usage": None} if req.include_usage else {}
    offsets = {i: len(echoes[i // req.n]) for i in range(len(echoes) * req.n)}
    for i, echo in enumerate(echoes):
        for j in range(req.n if echo else 0):
            yield reply.wrap([{"index": i * req.n + j, "text": echo, "logprobs": None, "finish_reason": None}],
                             **usage_null)
    async for event in job.events():
        if isinstance(event, Delta):
            logprobs = _completion_logprobs(tokenizer, event.token_ids, event.logprobs, event.top_logprobs,
                                            offsets[event.index]) if req.logprobs else None
            offsets[event.index] += len(event.text)
            yield reply.wrap([{"index": event.index, "text": event.text, "logprobs": logprobs,
                               "finish_reason": None}], **usage_null)
        else:
            yield reply.wrap([{"index": event.choice.index, "text": "", "logprobs": None,
                               "finish_reason": event.choice.finish_reason}], **usage_null)
    if req.include_usage:
        yield reply.wrap([], usage=job.usage().to_json())


# ---- /v1/embeddings ---------------------------------------------------------------------------------


async def embeddings(request: Request) -> JSONResponse:
    req = parse_embedding(await read_json(request))
    manager = request.app.state.manager
    lease = await _borrow(request, req.model)
    try:
        body = await until_disconnect(request, embed_request(lease.engine, req, lease.name))
    finally:
        manager.release(lease)
    return JSONResponse(body)


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
