"""Every recipe in recipes/ loads and validates (STYLE item 11) and says what it is for."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcpt.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(r.name == "tiny_cpu.yaml" for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(recipe):
    load_config(recipe)
    first = recipe.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{recipe.name} must start with a comment saying what it is for"
