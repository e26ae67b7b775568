"""The real TUI driven through tmux (see tests/tmux_tui_check.py)."""

from __future__ import annotations

import shutil

import pytest

import tmux_tui_check


@pytest.mark.slow
@pytest.mark.real_driver
@pytest.mark.timeout(600)
def test_tui_in_tmux_start_models_session_message_quit():
    assert shutil.which("tmux"), "tmux is not installed: install it (apt-get install tmux) to run the TUI check"
    try:
        tmux_tui_check.check(timeout=240)
    except tmux_tui_check.CheckFailed as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.mark.slow
@pytest.mark.real_driver
@pytest.mark.timeout(600)
def test_tui_in_tmux_attaches_to_a_running_server():
    assert shutil.which("tmux"), "tmux is not installed: install it (apt-get install tmux) to run the TUI check"
    try:
        tmux_tui_check.check_attached(timeout=240)
    except tmux_tui_check.CheckFailed as exc:
        pytest.fail(str(exc), pytrace=False)
