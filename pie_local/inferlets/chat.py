"""A chat through the model's chat template: one reply to --message, or a conversation driven by
the client (each message it sends is a user turn; None or "/exit" ends it)."""

from __future__ import annotations

from pie_local import Param, SamplingParams

NAME = "chat"
DESCRIPTION = "Chat through the chat template: one --message here, or a conversation via `pie-local chat`."
PARAMETERS = {
    "message": Param(str, default=None, help="reply to this one message and exit"),
    "system": Param(str, default=None, help="system prompt"),
    "max_tokens": Param(int, default=512, help="tokens per reply at most"),
    "temperature": Param(float, default=0.0, help="0 = greedy"),
    "top_p": Param(float, default=1.0, help="nucleus sampling mass"),
    "seed": Param(int, default=None, help="seed for reproducible sampling"),
}

TURN_END = "turn_end"  # data message sent after each reply of an interactive chat


async def main(rt, args):
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    ctx = rt.context()
    if args.system:
        ctx.system(args.system)

    async def reply(text: str) -> str:
        ctx.user(text)
        async for piece in ctx.stream(sampling, max_tokens=args.max_tokens):
            rt.emit(piece)
        return ctx.last.text

    if args.message is not None:
        return await reply(args.message)
    while True:
        message = await rt.receive()
        if message is None or str(message).strip() == "/exit":
            return ctx.messages
        await reply(str(message))
        rt.send({"event": TURN_END, "tokens": len(ctx), "pages": ctx.n_pages})
