"""Plan reuse across denoising steps (``ISAConfig(plan_reuse=k)``, :mod:`isa_plugin.plan_reuse`)."""

import pytest
import torch

from isa_plugin import ISAConfig, Layout
from isa_plugin.attention import Route, run_isa
from isa_plugin.execution import get_executor
from isa_plugin.executors.reference import plan_reference
from isa_plugin.kernels.reference import execute_plan_reference
from isa_plugin.plan_reuse import PlanStore, StepClock

LAYOUT = Layout([("target", 192), ("context", 192)])


def _qkv(seed, B=1, H=2, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, LAYOUT.num_tokens, H, D, generator=g, dtype=torch.float64) for _ in range(3)]


def test_clock_steps_branches_and_runs():
    c = StepClock()
    seen = [c.tick(t) for t in (900.0, 900.0, 800.0, 800.0, 700.0, 950.0, None, None)]
    assert seen == [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (0, 0, True), (1, 0, False), (2, 0, False)]
    assert c.runs == 2


@pytest.mark.parametrize("mode, settings", [("fixed", {"alpha_s": 0.5, "alpha_f": 0.25, "alpha_ns": 0.25}),
                                            ("adaptive", {"mass": 0.8})])
def test_run_isa_executes_the_kept_plan(mode, settings):
    """Steps 0..4 with plan_reuse=2: steps 0, 2, 4 plan, steps 1, 3 execute the previous step's plan on their
    own q, k, v; each branch (separate CFG calls) keeps its own plan."""
    cfg = ISAConfig(mode, block_size=32, plan_reuse=2, **settings)
    route, store, sc = Route("reference"), PlanStore(), 16 ** -0.5
    inputs = {(s, b): _qkv(10 * s + b) for s in range(5) for b in range(2)}
    made = {}
    for s in range(5):
        for b in range(2):
            q, k, v = inputs[(s, b)]
            out = run_isa(q, k, v, LAYOUT, cfg, route, sc, plans=store, timestep=1000.0 - 100 * s)
            src = s - (s % 2)  # the step whose plan serves step s
            pq, pk, _ = inputs[(src, b)]
            want = execute_plan_reference(q, k, v, plan_reference(pq, pk, LAYOUT, cfg, sc), sc)
            assert torch.equal(out, want), (s, b)
            made[(s, b)] = out
    assert (store.planned, store.reused) == (6, 4)
    q, k, v = inputs[(1, 0)]
    fresh = execute_plan_reference(q, k, v, plan_reference(q, k, LAYOUT, cfg, sc), sc)
    assert not torch.equal(fresh, made[(1, 0)])  # a stale plan is not the fresh one: the test can fail


def test_plan_reuse_one_or_no_store_plans_every_call():
    q, k, v = _qkv(0)
    fresh = get_executor("reference").run(q, k, v, LAYOUT, ISAConfig(block_size=32), 0.25)
    store = PlanStore()
    for t in (900.0, 800.0):
        out = run_isa(q, k, v, LAYOUT, ISAConfig(block_size=32), Route("reference"), 0.25, plans=store, timestep=t)
        assert torch.equal(out, fresh)
    assert (store.planned, store.reused) == (0, 0)


def test_a_changed_call_plans_again():
    """A kept plan serves only a call of the same shape, layout and config."""
    cfg = ISAConfig(block_size=32, plan_reuse=4)
    store = PlanStore()
    q, k, v = _qkv(0)
    run_isa(q, k, v, LAYOUT, cfg, Route("reference"), 0.25, plans=store, timestep=900.0)
    run_isa(q, k, v, LAYOUT, cfg.replace(alpha_s=0.5), Route("reference"), 0.25, plans=store, timestep=800.0)
    q2, k2, v2 = (x[:, :, :1] for x in (q, k, v))
    run_isa(q2, k2, v2, LAYOUT, cfg, Route("reference"), 0.25, plans=store, timestep=700.0)
    assert (store.planned, store.reused) == (3, 0)


def test_config_plan_reuse_validated_and_round_trips():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="plan_reuse"):
            ISAConfig(plan_reuse=bad)
    cfg = ISAConfig(plan_reuse=3)
    assert cfg.plan_reuse == 3 and ISAConfig.decode(cfg.encode()) == cfg and cfg.to_dict()["plan_reuse"] == 3
    assert "plan_reuse" not in ISAConfig().to_dict()  # configs and profiles that plan every call are unchanged


def test_profile_keeps_plan_reuse(tmp_path):
    from isa_plugin import ThresholdProfile
    from isa_plugin.layer_setting import LayerSetting
    from isa_plugin.profile_io import save_profile

    p = ThresholdProfile(layers={"a": [LayerSetting(ISAConfig(plan_reuse=2, alpha_s=0.25))], "b": [LayerSetting(alpha_s=0.25)]})
    path = save_profile(p, tmp_path / "p.yaml")
    assert "plan_reuse: 2" in path.read_text()
    q = ThresholdProfile.load(path)
    assert q.setting("a").to_config().plan_reuse == 2 and q.setting("b").to_config().plan_reuse == 1


def test_processor_reuses_plans_across_transformer_steps(wan_kit):
    """Inside a model: the processors read the step from the transformer's timestep; counters show reuse."""
    from isa_plugin import apply_isa, stats
    from isa_plugin.adapters import reset_stats
    from isa_plugin.adapters.families.wan import WanICLLayout

    t = wan_kit.wan(num_layers=1)
    apply_isa(t, ISAConfig(block_size=16, backend="reference", plan_reuse=2, alpha_s=0.5), layout=WanICLLayout(2))
    x = wan_kit.wan_inputs(frames=4)
    for ts in (900, 800, 700):
        wan_kit.run(t, dict(x, timestep=torch.full((1,), ts)))
    (s,) = stats(t).values()
    assert s["isa_calls"] == 3 and s["fallbacks"] == 0 and s["reused_plans"] == 1, s
    reset_stats(t)  # drops the kept plans: the next call plans
    wan_kit.run(t, dict(x, timestep=torch.full((1,), 600)))
    (s,) = stats(t).values()
    assert s["isa_calls"] == 1 and s["reused_plans"] == 0, s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend, mode, settings", [("triton", "fixed", {}), ("sparse", "adaptive", {"mass": 0.9}),
                                                     ("flex", "adaptive", {"mass": 0.9})])
def test_gpu_executor_runs_a_kept_plan_on_new_inputs(backend, mode, settings):
    """bf16 on the GPU: each executor's plan of step-0 inputs, executed on step-1 inputs, equals the reference
    running that plan on step 1 (FlashAttention's rule against PyTorch in bf16), and not the fresh plan's output."""
    from isa_plugin.kernels.compact import compact_to_block_plan
    from isa_plugin.kernels.testing import check_close

    layout = Layout([("text", 77), ("target", 2048), ("context", 2048)])
    cfg = ISAConfig(mode, block_size=128, backend=backend, **settings)
    g = torch.Generator(device="cuda").manual_seed(0)
    q1, k1, _, q2, k2, v2 = (torch.randn(1, layout.num_tokens, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16)
                             for _ in range(6))
    sc = 128 ** -0.5
    ex = get_executor(backend)
    kept = ex.plan(q1, k1, None, layout, cfg, sc)
    got = ex.execute(q2, k2, v2, layout, cfg, sc, kept)
    plan = kept if backend != "triton" else compact_to_block_plan(kept)
    ref = execute_plan_reference(q2.double(), k2.double(), v2.double(), plan, sc)
    base = execute_plan_reference(q2, k2, v2, plan, sc)
    ok, err, berr = check_close(got, ref, base, atol=1e-3)
    assert ok, (err, berr)
    fresh = ex.run(q2, k2, v2, layout, cfg, sc)
    assert (fresh.double() - got.double()).abs().max().item() > 2 * berr + 1e-3  # the kept plan is not the fresh one
