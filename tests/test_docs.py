"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from phoenix_node.config import configuration_page

from .conftest import REPO_ROOT


def test_configuration_page_matches_the_declared_options() -> None:
    page = Path(REPO_ROOT, "docs", "configuration.md").read_text()
    assert page == configuration_page(), "regenerate: python -m phoenix_node.config > docs/..."


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = Path(REPO_ROOT, "README.md").read_text()
    ci_command = Path(REPO_ROOT, ".ci", "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme
