"""Prefix caching with named snapshots: the first run prefills a (long) prefix and saves its KV
under a name; later runs, in this process or after a restart, reopen the snapshot and continue
from it without prefilling the prefix again."""

from __future__ import annotations

from pie_local import Context, Param, SamplingParams
from pie_local.runtime.snapshots import SnapshotError, snapshot_path

NAME = "prefix-cache"
DESCRIPTION = "Save a prefix's KV as a named snapshot, or reopen it and continue without re-prefill."
PARAMETERS = {
    "name": Param(str, required=True, help="snapshot name"),
    "prefix": Param(str, default=None, help="text to prefill and save when the snapshot does not exist yet"),
    "prompt": Param(str, default="", help="text appended after the prefix before generating"),
    "max_tokens": Param(int, default=64, help="tokens to generate (0: only save/open)"),
    "refresh": Param(bool, default=False, help="prefill and save again even if the snapshot exists"),
}


async def main(rt, args):
    exists = snapshot_path(args.name).exists()
    if exists and not args.refresh:
        ctx = await Context.open(rt, args.name)
        reused = True
    else:
        if args.prefix is None:
            raise SnapshotError(f"no snapshot named {args.name!r} yet: give --prefix to create it")
        ctx = rt.context()
        ctx.fill(args.prefix)
        await ctx.flush()
        await ctx.save(args.name)
        reused = False
    prefix_tokens = len(ctx)
    if args.prompt:
        ctx.fill(args.prompt)
    text = ""
    if args.max_tokens > 0:
        async for piece in ctx.stream(SamplingParams.greedy(), max_tokens=args.max_tokens):
            rt.emit(piece)
        text = ctx.last.text
    return {"snapshot": args.name, "reused": reused, "prefix_tokens": prefix_tokens, "text": text}
