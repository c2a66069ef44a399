"""The mutation-testing machinery of ``bench/mutation.py`` (issue #20), kept from rotting: every declared mutant
still applies to exactly one place in the current sources, and a small fixed sample of mutants (one per file kind:
a forward kernel, a backward kernel, a launcher) is killed by a quick test, each in a private copy under tmp_path.

The full run (every mutant against the kernel-family tests, about an hour on 2 cores) stays out of CI:
bench/MUTATION.md has its command and numbers.
"""

import pathlib
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import mutation  # noqa: E402

# (mutant id, the quick test that kills it)
SAMPLE = [
    ("out-causal-strict", "tests/test_forward.py::test_non_contiguous_inputs"),
    ("g-sign", "tests/test_backward.py::test_gradient_only_through_output"),
    ("pass-through-no-zero", "tests/test_forward.py::test_empty_sequence"),
]


def test_every_mutant_applies_to_exactly_one_place():
    mutation.check(mutation.MUTANTS, ROOT)
    assert len(mutation.MUTANTS) >= 50
    assert {m.kind for m in mutation.MUTANTS} == set(mutation.KINDS)


def test_a_stale_mutant_fails_loudly():
    stale = mutation.Mutant("stale", "arithmetic", mutation.FORWARD, "b_den = scale * b_den + eps + 1", "x")
    with pytest.raises(mutation.MutantError, match="occurs 0 times"):
        mutation.check([stale], ROOT)
    twice = mutation.Mutant("twice", "comparison", mutation.FORWARD, "o_m < M", "o_m <= M")
    with pytest.raises(mutation.MutantError, match="occurs [2-9] times"):
        mutation.check([twice], ROOT)


def test_first_tests_move_to_the_front():
    m = mutation.by_id(["decode-z-minus"])[0]
    order = m.tests(mutation.DEFAULT_TESTS)
    assert order[0] == "tests/test_decode.py" and sorted(order) == sorted(mutation.DEFAULT_TESTS)


def test_sample_mutants_are_killed(tmp_path):
    """Each sample mutant, applied in its own copy of this checkout, fails its quick test (pytest exit 1: a test
    failed, not a collection error), and the copy's file is restored afterwards."""
    copies = []
    for i in range(len(SAMPLE)):
        copies.append(mutation.make_copy(ROOT, tmp_path / f"copy{i}"))
    mutation.verify_copy(copies[0])  # lintx_triton imports from the copy, not from this checkout
    mutants = mutation.by_id([i for i, _ in SAMPLE])
    originals = [(c / m.file).read_text() for c, m in zip(copies, mutants)]

    def run(i):
        return mutation.run_mutant(mutants[i], copies[i], [SAMPLE[i][1]], timeout=300)

    with ThreadPoolExecutor(len(SAMPLE)) as ex:
        results = list(ex.map(run, range(len(SAMPLE))))
    for (mid, test), r in zip(SAMPLE, results):
        assert (r["outcome"], r["rc"]) == ("killed", 1), (mid, r)
        assert r["by"].startswith("FAILED " + test), (mid, r["by"])
    for c, m, text in zip(copies, mutants, originals):
        assert (c / m.file).read_text() == text
