"""Chat with a model in the terminal, replies streamed as they are generated.

Type a message and press Enter; /exit or Ctrl-D ends the chat. Stdin may be a pipe: each line is
one user turn and only the replies are printed, one per line. When a pie-local server runs, the
chat runs there (--local: always in this process; --server URL: that server).

examples:
  pie-local chat
  pie-local chat --model qwen2.5-0.5b --system 'You answer in one sentence.'
  printf 'Hi!\nWhat is the capital of France?\n' | pie-local chat
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pie_local.cli.run import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument("--system", "-s", default=None, help="system prompt")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_chat(args))


def _read_line(interactive: bool) -> str | None:
    """One line of input, None at end of input (Ctrl-D)."""
    try:
        if interactive:
            return input(">>> ")
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None
    except EOFError:
        return None


class LineReader:
    """Reads stdin on a daemon thread, one line per request: a pending read never blocks exit
    (Ctrl-C while waiting for input would otherwise wait for the thread to finish its read)."""

    def __init__(self, interactive: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._interactive = interactive
        self._wanted = threading.Semaphore(0)
        self._lines: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._run, name="pie-chat-stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._wanted.acquire()
            line = _read_line(self._interactive)
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
            if line is None:
                return

    async def readline(self) -> str | None:
        self._wanted.release()
        return await self._lines.get()


async def _chat(args: argparse.Namespace) -> int:
    from pie_local.cli.target import describe_failure, open_target
    from pie_local.inferlets.chat import TURN_END
    from pie_local.present.problems import UserError

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    async with open_target(args) as target:
        reader = LineReader(interactive)
        handle = await target.launch("chat", {"system": args.system, "max_tokens": args.max_tokens,
                                              "temperature": args.temperature, "seed": args.seed})
        if interactive:
            print(f"chatting with {target.label} — /exit or Ctrl-D to quit", file=sys.stderr)
        stream = handle.messages()
        while True:
            line = await reader.readline()
            if line is None or line.strip() == "/exit":
                await handle.send(None)
                break
            if not line.strip():
                continue
            await handle.send(line)
            async for msg in stream:
                if msg.kind == "text":
                    sys.stdout.write(msg.data)
                    sys.stdout.flush()
                elif isinstance(msg.data, dict) and msg.data.get("event") == TURN_END:
                    break
            else:  # the inferlet ended: it failed
                break
            sys.stdout.write("\n")
            sys.stdout.flush()
        await stream.aclose()
        try:
            await handle.result()
        except Exception as exc:  # noqa: BLE001 — the inferlet's error, shown without a traceback
            print(file=sys.stderr)  # the error goes below a partial reply, not after it
            raise UserError(f"chat failed: {describe_failure(exc)}") from exc
        return 0
