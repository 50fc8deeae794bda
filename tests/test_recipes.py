"""Every code block of docs/recipes.md runs as it is, so that none can go stale."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def recipes():
    text = DOC.read_text()
    found = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        for block in re.findall(r"```python\n(.*?)```", section, re.S):
            found.append(pytest.param(block, id=re.sub(r"\W+", "-", title.lower()).strip("-")))
    return found


def test_the_page_has_its_recipes():
    assert len(recipes()) == 5


@pytest.mark.parametrize("code", recipes())
def test_recipe_runs(code):
    exec(compile(code, str(DOC), "exec"), {"__name__": "recipe"})
