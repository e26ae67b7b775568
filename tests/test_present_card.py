"""The model card: built once from the GGUF and the store, shown alike by `pie-local show` and the
TUI's details pane."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_hub import write_gguf
from textual.widgets import Static

from pie_local.cli import main
from pie_local.models import store
from pie_local.present.card import read_model_card
from pie_local.tui.app import PieApp
from pie_local.tui.backend import Backend
from tui_support import fake_engine_factory, wait_until

LABELS = ["name", "title", "architecture", "parameters", "quantization", "file size", "memory @ 1000 tok",
          "context", "layers", "embedding", "heads", "sliding window", "vocab", "chat template", "license",
          "file"]


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = write_gguf(tmp_path / "Tiny-Q8_0.gguf", n_layers=2, n_kv_heads=2, context_length=256)
    store.add(path, name="tiny")
    return path


def test_card_fields_and_values(tiny: Path) -> None:
    card = read_model_card("tiny", context=1000, kv_type="q8_0")
    fields = dict(card.fields)
    assert [label for label, _ in card.fields] == LABELS
    kv = 2 * 2 * (16 + 16) * 1000 * 34 // 32  # layers * kv heads * (K + V head dims) * tokens, q8_0
    assert card.data["memory"]["kv_cache"] == kv
    assert fields["memory @ 1000 tok"].endswith(f" + KV {kv / 1000:.1f} kB (q8_0)")
    assert (fields["title"], fields["architecture"], fields["context"]) == ("Tiny Test", "llama", "256")
    assert fields["heads"] == "4 (kv 2, head dim 16)" and fields["sliding window"] == "-"
    assert fields["vocab"] == "300 (llama)" and fields["license"] == "apache-2.0"
    assert fields["chat template"] == "built-in fallback" and fields["file"] == str(tiny)
    assert fields["quantization"].startswith("Q8_0  [")


def test_context_defaults_to_the_models_own(tiny: Path) -> None:
    card = read_model_card("tiny")
    assert card.data["memory"]["context"] == 256 and "memory @ 256 tok" in dict(card.fields)


def test_a_template_in_the_gguf_is_named_as_its_source(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "chatty.gguf", chat_template="{{ messages }}")
    assert dict(read_model_card(str(path)).fields)["chat template"] == "from the GGUF"


def test_show_prints_the_card_as_text_and_json(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = read_model_card("tiny", context=4096)
    # the fixture holds metadata only, so the placement after the card says why it has none
    no_placement = "format: tensor 'blk.0.attn_norm.weight' is missing"
    assert main(["show", "tiny", "--context", "4096"]) == 0
    assert capsys.readouterr().out == card.text() + f"\n\nplacement: unavailable ({no_placement})\n"
    assert main(["show", "tiny", "--context", "4096", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown.pop("placement") == {"unavailable": no_placement}
    assert shown == json.loads(json.dumps(card.data))


async def test_the_tui_details_pane_shows_the_same_card(tiny: Path) -> None:
    card = read_model_card("tiny", context=4096)  # the TUI estimates memory at 4096 tokens
    app = PieApp(backend=Backend(engine_factory=fake_engine_factory()), start_mode="models")
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.screen.query_one("#details", Static)
        await wait_until(pilot, lambda: "architecture" in str(pane.render()), what="details")
        assert str(pane.render()) == card.text()
