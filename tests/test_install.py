"""CI tests what a user installs: the package under test comes from `pip install .`, not the source tree."""

from __future__ import annotations

import os

import pytest
from package_env import PACKAGE_ROOT


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI must test the installed package")
def test_ci_imports_the_installed_package() -> None:
    assert PACKAGE_ROOT.name == "site-packages", f"pie_local imported from {PACKAGE_ROOT}, not an installed package"
