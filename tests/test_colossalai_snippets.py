"""Every Colossal-AI snippet of the site passes the check against colossalai 0.5.0; broken ones fail

Runs only in ``nox -s colossalai`` (marker ``colossalai``). The breaks are the mistakes that
snippets of older releases make: a removed keyword (``autoparallelize(device_mesh=...)``), a
removed module (what ``lightning_colossalai`` 0.1.0 imports), a name never defined.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("colossalai")
pytest.importorskip("pyflakes")
from cai_labs.colossal.check import (  # noqa: E402
    REMOVED,
    check_names,
    check_snippet,
    check_source,
    find_snippets,
)
from cai_labs.colossal.components import COMPONENTS  # noqa: E402

pytestmark = pytest.mark.colossalai
ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = find_snippets(ROOT)

GOOD = """
def run(model, steps=1):
    import torch
    from colossalai.auto_parallel.tensor_shard.initialize import autoparallelize
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    gm = autoparallelize(model, {"x": torch.empty(8, 4, device="meta")}, logical_mesh_shape=(2, 2))
    booster = Booster(plugin=TorchDDPPlugin())
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm, optimizer, *_ = booster.boost(gm, optimizer)
    booster.backward(gm(torch.ones(8, 4)).sum(), optimizer)
"""


def test_every_tutorial_with_colossalai_has_its_snippets():
    pages = {s.path.name for s in SNIPPETS}
    for page in sorted((ROOT / "tutorials").glob("tutorial_*.py")):
        if "colossalai" in page.read_text():
            assert page.name in pages, f"{page.name} names Colossal-AI but has no checked snippet"
    assert len(SNIPPETS) >= 11


def test_no_snippet_left_in_a_comment_block():
    code_in_comment = re.compile(r"^#\s{4,}(import colossalai|from colossalai)", re.MULTILINE)
    for page in sorted((ROOT / "tutorials").glob("tutorial_*.py")):
        assert not code_in_comment.findall(page.read_text()), f"{page.name}: code in a comment"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.label for s in SNIPPETS])
def test_snippet_passes_the_check(snippet):
    result = check_snippet(snippet)
    assert result.ok, result.problems
    assert result.imports > 0 and result.calls > 0


def test_every_named_api_resolves():
    pages = sorted((ROOT / "tutorials").glob("tutorial_*.py")) + sorted(
        (ROOT / "docs").glob("*/*.md")
    )
    for path in pages:
        _, problems = check_names(path.read_text())
        assert not problems, (path.name, problems)


def test_the_good_snippet_passes():
    result = check_source(GOOD)
    assert result.ok, result.problems
    assert result.imports == 4 and result.calls >= 6


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (
            "logical_mesh_shape=(2, 2)",
            "device_mesh=None",
            "unexpected keyword argument 'device_mesh'",
        ),
        ("booster.backward(", "booster.backwards(", "has no attribute 'backwards'"),
        ("booster.boost(gm, optimizer)", "booster.boost()", "missing a required argument"),
        (
            "from colossalai.booster import Booster",
            "from colossalai.nn.parallel import GeminiDDP as Booster",
            "No module named 'colossalai.nn.parallel'",
        ),
        ("    from colossalai.booster import Booster\n", "", "undefined name 'Booster'"),
        ("lr=0.1)", "lr=lr)", "undefined name 'lr'"),
    ],
)
def test_a_broken_snippet_fails(old, new, expected):
    assert old in GOOD
    result = check_source(GOOD.replace(old, new))
    assert not result.ok
    assert any(expected in p for p in result.problems), result.problems


def test_names_cited_as_removed_are_really_gone():
    count, problems = check_names(" ".join(f"``{name}``" for name in sorted(REMOVED)))
    assert count == len(REMOVED) and not problems
    _, problems = check_names("``colossalai.booster.Booster`` ``colossalai.boosterr``")
    assert problems == [
        "colossalai.boosterr: ModuleNotFoundError: No module named 'colossalai.boosterr'"
    ]


def test_a_tutorial_function_sees_the_page_imports():
    source = textwrap.dedent(
        """
        import torch


        def snippet():
            from colossalai.booster.plugin import TorchDDPPlugin

            return TorchDDPPlugin(), torch.zeros(1)
        """
    )
    assert check_source(source, first=5).ok
    assert not check_source(source.replace("import torch\n", ""), first=4).ok


@pytest.mark.parametrize("component", COMPONENTS, ids=[c.name for c in COMPONENTS])
def test_every_component_resolves_and_links(component):
    count, problems = check_names(" ".join(f"``{api}``" for api in component.apis))
    assert count == len(component.apis) and not problems, problems
    importlib.import_module(component.module)
    assert (ROOT / "tutorials" / f"{component.tutorial}.py").is_file()
    labels = {s.label for s in SNIPPETS}
    assert f"{component.tutorial}.py:{component.snippet}" in labels
