"""`make mutants` stays honest: every curated mutant's snippet occurs exactly once in its file (a refactor
that moves the code must move the mutant too, or the mutant silently stops testing anything), and its pytest
arguments still select tests (a renamed test or parameter otherwise shows only as `make mutants`' exit 4/5)."""
import os
from pathlib import Path

import pytest

from megatron_patch.testing.mutant_list import MUTANTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_snippet_occurs_once(mutant):
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.original) == 1, f"{mutant.file}: snippet of {mutant.name!r} is stale"
    assert mutant.original != mutant.replacement


class _Collected:
    """The items of a collect-only session, with pytest's own `-k` matcher for each."""

    def __init__(self):
        self.items = {}

    def pytest_collection_finish(self, session):
        from _pytest.mark import KeywordMatcher  # what `-k` evaluates against (pytest's private API, pinned)

        self.items = {item.nodeid: KeywordMatcher.from_item(item) for item in session.items}


def _parse(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(paths and node ids, -k expressions) of a mutant's arguments; any other option is for a human to add."""
    targets, keywords, rest = [], [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-k":
            keywords.append(rest.pop(0))
        else:
            assert not arg.startswith("-"), f"{arg}: an option this check does not know; teach it"
            targets.append(arg)
    return targets, keywords


@pytest.fixture(scope="module")
def collected():
    """One collection of every file the mutants name, as `make mutants` runs them (from the repository root),
    in this process: under the whole suite the test modules are imported already."""
    files = sorted({t.split("::")[0] for m in MUTANTS for t in _parse(m.tests)[0]})
    plugin = _Collected()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "--capture=no", *files],
                           plugins=[plugin])
    finally:
        os.chdir(cwd)
    assert code == 0 and plugin.items, f"collecting {files} failed (pytest exit {code})"
    return plugin.items


def _selects(items: dict, args: tuple[str, ...]) -> list[str]:
    from _pytest.mark.expression import Expression

    targets, keywords = _parse(args)
    chosen = [i for i in items if any(i == t or i.startswith((t + "::", t + "[")) for t in targets)]
    for expr in keywords:
        chosen = [i for i in chosen if Expression.compile(expr).evaluate(items[i])]
    return chosen


def test_the_selection_check_can_fail(collected):
    """A renamed test, a stale parameter id and a -k that matches nothing select nothing."""
    assert _selects(collected, ("tests/test_faults.py::test_no_such_test",)) == []
    assert _selects(collected, ("tests/test_context_parallel.py::test_context_parallel_matches_single_rank[DP9]",)) == []
    assert _selects(collected, ("tests/test_kernels.py", "-k", "no_such_kernel")) == []
    assert _selects(collected, ("tests/test_kernels.py", "-k", "rope and not rope")) == []


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_arguments_select_tests(collected, mutant):
    chosen = _selects(collected, mutant.tests)
    assert chosen, f"{mutant.name!r}: {' '.join(mutant.tests)} selects no test (renamed?)"
