"""ISA under diffusers' Ulysses context parallelism, on CPU with gloo (2 processes; two cases with 4).

One launch per process count runs every case (see cp_harness); each test asserts on the results of all
ranks. Tolerance: 1e-6 in fp32 against single-process ISA (ISA itself is exact here: the exchange puts the
tokens back in canonical order, so the blocks and selections are those of one process).
"""

import pytest

pytest.importorskip("diffusers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import cp_harness  # noqa: E402
from rel_helpers import counters  # noqa: E402

TOL = 1e-6
CASES_2 = ["wan", "wan_uneven", "ltx2", "flux_kontext", "qwenimage_text_mask", "wan_ring", "liveditor", "liveditor_ring"]
RING = "context parallel: ring attention (ring_degree=2) is not supported by ISA; dense"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return cp_harness.launch(2, "cp_cases", CASES_2, tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return cp_harness.launch(4, "cp_cases", ["wan_p4", "liveditor_p4"], tmp_path_factory.mktemp("cp4"))


def _all_isa(stats):
    return all(s["isa_calls"] == 1 and s["fallbacks"] == 0 for s in stats.values()) and len(stats) > 0


def _check_family(ranks, case, stock=True):
    for r, res in enumerate(ranks):
        x = res[case]
        assert x["single_isa_vs_dense"] > 1e-3, (case, r, "ISA must differ from dense for the check to mean anything")
        assert x["apply_first"] <= TOL, (case, r, x)
        assert _all_isa(x["apply_first_stats"]), (case, r, x["apply_first_stats"])
        if stock:
            assert x["enable_first"] <= TOL, (case, r, x)
            assert _all_isa(x["enable_first_stats"]), (case, r, x["enable_first_stats"])
            assert x["removed_after_apply_first"] == 0.0, (case, r, x)
            assert x["removed_after_enable_first"] == 0.0, (case, r, x)
            assert x["reapplied"] == 0.0, (case, r, x)


@pytest.mark.parametrize("case", ["wan", "wan_uneven", "ltx2", "flux_kontext", "qwenimage_text_mask"])
def test_ulysses_isa_equals_single_process(two, case):
    _check_family(two, case)


def test_ring_falls_back_counted(two):
    for res in two:
        x = res["wan_ring"]
        assert x["vs_stock_ring"] == 0.0
        assert all(s == counters(fallbacks={RING: 1}) for s in x["stats"].values())


def test_four_processes(four):
    _check_family(four, "wan_p4")


def _check_liveditor(ranks, case):
    """ISA + LIVEditor's gated coarse residual under Ulysses equals single-process ISA + gate, per-head ratios
    sliced to each rank's heads, in both orders of apply and enable, with a dense layer (whose fallback keeps
    the residual) too; the counters equal the single-process ones."""
    for r, res in enumerate(ranks):
        x = res[case]
        assert x["single_isa_vs_dense"] > 1e-3, (case, r, x)
        assert "not context-parallel" in (x["stock_cp_raised"] or ""), (case, r, x)
        for key in ("apply_first", "enable_first", "mixed"):
            assert x[key] <= TOL, (case, r, key, x)
            assert x[f"{key}_stats_equal"], (case, r, key, x)
        assert x["mixed_stats"]["blocks.0.attn1"]["reasons"] == {"layer left dense (no config)": 1}


def test_liveditor_gated_residual(two):
    _check_liveditor(two, "liveditor")


def test_liveditor_gated_residual_four_processes(four):
    _check_liveditor(four, "liveditor_p4")


def test_liveditor_ring_raises(two):
    for res in two:
        assert "ring attention" in (res["liveditor_ring"]["raised"] or ""), res["liveditor_ring"]
