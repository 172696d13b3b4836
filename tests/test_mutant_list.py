"""`make mutants` stays honest: every curated mutant's snippet occurs exactly once in its file (a refactor
that moves the code must move the mutant too, or the mutant silently stops testing anything)."""
from pathlib import Path

import pytest

from megatron_patch.testing.mutant_list import MUTANTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_snippet_occurs_once(mutant):
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.original) == 1, f"{mutant.file}: snippet of {mutant.name!r} is stale"
    assert mutant.original != mutant.replacement
