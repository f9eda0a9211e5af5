"""Every recipe in recipes/ loads and validates (STYLE item 11) and says what it is for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longcpt.config import Config, load_config
from longcpt.namm.config import NammRecipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(r.name == "tiny_cpu.yaml" for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_validates(recipe):
    schema = NammRecipe if "namm" in yaml.safe_load(recipe.read_text()) else Config  # `longcpt namm train`'s
    load_config(recipe, schema=schema)
    first = recipe.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{recipe.name} must start with a comment saying what it is for"
