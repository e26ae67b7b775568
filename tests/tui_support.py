"""Helpers for the TUI tests: a FakeDriver engine factory, tiny installed models, a fixed backend."""

from __future__ import annotations

import asyncio
from pathlib import Path

from runtime_helpers import fake_engine

from pie_local.present.card import ModelCard
from pie_local.tui.backend import Backend, CatalogueRow, InferletRow, ModelRow, MonitorSnapshot


def fake_engine_factory(calls: list[str] | None = None, reply=lambda user: f"You said **{user}**.",
                        delay: float = 0.0):
    """engine_factory for Backend: an Engine over FakeDriver (no real model) whose toy model is
    scripted to answer each user turn with ``reply(user_text)`` and then end its turn.

    ``calls`` collects the model names the factory was asked for (lazy loading is observable)."""

    def factory(model: str):
        from pie_local.driver.fake import FakeDriver
        from pie_local.driver.types import DriverParams
        if calls is not None:
            calls.append(model)
        driver = FakeDriver(DriverParams(page_size=4, n_pages=256, max_batch_tokens=64),
                            next_token=scripted_chat(reply), delay=delay, name=model)
        return fake_engine(driver)

    return factory


def scripted_chat(reply):
    """A FakeDriver next_token rule: after ``<start_of_turn>model\n`` say reply(last user text)."""
    from pie_local.driver.fake import FakeTokenizer

    tok = FakeTokenizer()
    model_turn = tok.encode("<start_of_turn>model\n")
    user_turn = tok.encode("<start_of_turn>user\n")
    end_of_turn = tok.token_id("<end_of_turn>")

    def last_index(seq: list[int], sub: list[int]) -> int | None:
        for i in range(len(seq) - len(sub), -1, -1):
            if seq[i : i + len(sub)] == sub:
                return i
        return None

    def rule(visible: list[int]) -> int | None:
        at = last_index(visible, model_turn)
        if at is None:
            return None
        start = last_index(visible[:at], user_turn)
        user = tok.decode(visible[start + len(user_turn) : at]) if start is not None else ""
        user = user.removesuffix("\n").removesuffix("<end_of_turn>")
        answer = tok.encode(reply(user))
        k = len(visible) - (at + len(model_turn))  # tokens of the reply so far
        return answer[k] if k < len(answer) else end_of_turn

    return rule


def install_tiny_model(tmp_path: Path, name: str = "tiny-llama", arch: str = "llama") -> Path:
    """Write a tiny GGUF and add it in place to the store, as `pie-local add` would."""
    from pie_local.models import store
    from tiny_models import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / f"{name}.gguf", arch)
    store.add(path, name=name)
    return path


async def wait_until(pilot, predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Let the app run until predicate() is true (workers and timers need real time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


class StaticBackend(Backend):
    """Fixed data for snapshot tests: screenshots must not depend on paths, clocks or speed."""

    def installed(self) -> list[ModelRow]:
        return [
            ModelRow("gemma3-270m", "Q4_K_M", 253_000_000, "gemma3", "gemma3-270m.gguf"),
            ModelRow("qwen2.5-0.5b", "Q4_K_M", 398_000_000, "qwen2", "qwen2.5-0.5b.gguf"),
        ]

    def catalogue(self) -> list[CatalogueRow]:
        return [
            CatalogueRow("gemma3-270m", "gemma3", "270M", ("Q4_K_M",), "Q4_K_M", 253_000_000, "Starter model",
                         True),
            CatalogueRow("qwen2.5-0.5b", "qwen2", "0.5B", ("Q4_K_M", "Q8_0"), "Q4_K_M", 398_000_000,
                         "Qwen2.5 0.5B Instruct", True),
            CatalogueRow("llama3.2-1b", "llama", "1B", ("Q4_K_M", "Q8_0"), "Q4_K_M", None,
                         "Llama 3.2 1B Instruct", False),
        ]

    def details(self, name: str, context: int = 4096) -> ModelCard:
        return ModelCard(name, (("name", name), ("architecture", "gemma3"), ("parameters", "268.1M"),
                                (f"memory @ {context} tok", "300.5 MB"), ("layers", "18")))

    def inferlets(self) -> list[str]:
        return ["chat", "text-completion"]

    def monitor(self) -> MonitorSnapshot:
        return MonitorSnapshot(
            model="gemma3-270m",
            inferlets=(InferletRow("1", "chat", "running", 412, 13, 4.2),
                       InferletRow("2", "best-of-n", "queued", 0, 0, 0.1)),
            pages_used=40, pages_shared=8, pages_free=216, pages_cached=12, tokens_per_s=57.5,
            batch_requests=2.0, batch_tokens=33.0, prefix_hit_rate=0.42, memory_bytes=300_000_000,
            drafted_tokens=120, accepted_tokens=93,
        )
