"""An Engine over FakeDriver, with the fake tokenizer and chat template that go with it."""

from __future__ import annotations

from typing import Any

from pie_local.driver.fake import FakeChatTemplate, FakeDriver
from pie_local.runtime.engine import Engine, EngineConfig


def fake_engine(driver: FakeDriver | None = None, config: EngineConfig | None = None,
                chat_template: Any = None) -> Engine:
    driver = driver or FakeDriver()
    return Engine(driver=driver, config=config, tokenizer=driver.tokenizer,
                  chat_template=chat_template or FakeChatTemplate())
