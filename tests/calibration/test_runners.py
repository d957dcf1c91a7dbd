"""Every registered family: tiny pipeline -> save_pretrained -> ``isa calibrate`` (bundled samples) -> profile applied."""

import pytest

pytest.importorskip("diffusers")

from isa_plugin.adapters import apply_isa, registered_families, registered_pipelines, remove_isa, stats  # noqa: E402
from isa_plugin.calibration.runners import registered_runners  # noqa: E402
from isa_plugin.cli import main  # noqa: E402
from isa_plugin.pipelines.tiny import TINY_FAMILIES, build_tiny_pipeline  # noqa: E402
from isa_plugin.profile import ThresholdProfile  # noqa: E402

FAMILIES = sorted({f.name for f in registered_families().values()})
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_pipeline_has_a_runner_and_every_family_a_tiny_pipeline():
    served = {c: r.adapter for r in registered_runners().values() for c in r.pipeline_classes}
    for cls_name, adapter in registered_pipelines().items():
        assert served.get(cls_name) == adapter.name, f"pipeline {cls_name} (adapter {adapter.name}) has no calibration runner"
    missing = [f for f in FAMILIES if f not in TINY_FAMILIES]
    assert not missing, f"families without a tiny pipeline: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_calibrates_from_the_cli_and_the_profile_applies(family, tmp_path, capsys):
    options = {"two_experts": True} if family == "wan" else {}
    pipe = build_tiny_pipeline(family, **options)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "profile.yaml"
    rc = main(["calibrate", "--pipeline", str(tmp_path / "pipe"), "--steps", "2", "--budget", "0.1", "--out", str(out),
               "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "held-out check" in printed.out
    prof = ThresholdProfile.load(out)
    on = prof.calibrated_on
    assert on["num_samples"] == 2 and on["pipeline_class"] == type(pipe).__name__
    names = set(prof.layers)
    if family == "wan":  # both experts calibrated and keyed
        assert any(n.startswith("transformer_2/") for n in names) and any("/" not in n for n in names)
    for name, per_bucket in on["held_out"].items():
        for check, setting in zip(per_bucket, prof.layers[name]):
            assert check["samples"] == 2 and check["held_out_target"] is not None
            if not setting.dense:
                assert check["held_out_target"] <= 0.1 and check["held_out_context"] <= 0.1
    apply_isa(pipe, prof)
    assert set(stats(pipe)) == names
    remove_isa(pipe)


def test_calibrate_help_lists_one_family_per_line(capsys):
    assert main(["calibrate", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for r in registered_runners().values():
        mine = [ln for ln in lines if ln.strip().startswith(f"{r.adapter} (")]
        assert len(mine) == 1, f"{r.adapter}: {mine}"
        assert all(c in mine[0] for c in r.pipeline_classes) and mine[0].rstrip().endswith(r.inputs)
