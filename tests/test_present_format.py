"""The one formatting module: decimal sizes labelled as such, counts, tables, aligned labels."""

from __future__ import annotations

import pytest

from pie_local.present.format import human_count, human_size, label_lines, print_table


@pytest.mark.parametrize(("n", "text"), [
    (None, "-"), (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1_234_567, "1.2 MB"),
    (253_113_024, "253.1 MB"), (1024 ** 3, "1.1 GB"), (2.5e12, "2.5 TB"), (7e15, "7000.0 TB"),
])
def test_sizes_are_decimal(n, text) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (None, "-"), (999, "999"), (1500, "1.5k"), (268_098_176, "268.1M"), (7_241_732_096, "7.2B"),
])
def test_counts(n, text) -> None:
    assert human_count(n) == text


def test_table_pads_columns_and_label_lines_align_values(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(("NAME", "SIZE"), [("gemma3-270m", "253.1 MB"), ("x", "-")])
    assert capsys.readouterr().out == "NAME         SIZE\ngemma3-270m  253.1 MB\nx            -\n"
    assert label_lines([("name", "tiny"), ("file size", "1.0 kB")]) == "name       tiny\nfile size  1.0 kB"
    assert label_lines([]) == ""


async def test_the_tui_prints_sizes_as_the_cli_does() -> None:
    from textual.widgets import DataTable

    from pie_local.tui.app import PieApp
    from pie_local.tui.widgets.status_bar import StatusBar
    from tui_support import StaticBackend, wait_until

    app = PieApp(backend=StaticBackend(), start_mode="models")
    async with app.run_test(size=(120, 30)) as pilot:
        table = app.screen.query_one("#installed", DataTable)
        await wait_until(pilot, lambda: table.row_count == 2, what="installed models")
        assert table.get_row_at(0)[2] == "253.0 MB"  # 253_000_000 bytes
        assert "mem 300.0 MB" in str(app.screen.query_one(StatusBar).render())  # 300_000_000 bytes
