"""Pins the public surface: a change here is a change of the package's contract."""

import isa_plugin

EXPECTED = {
    "Layout",
    "ISAConfig",
    "ISAInfo",
    "isa_attention",
    "apply_isa",
    "remove_isa",
    "stats",
    "ISAProcessor",
    "ThresholdProfile",
    "fit_profile",
    "__version__",
}


def test_all_is_pinned():
    assert set(isa_plugin.__all__) == EXPECTED


def test_all_names_exist_and_are_documented():
    for name in isa_plugin.__all__:
        obj = getattr(isa_plugin, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def _fresh_modules(code: str) -> set:
    """The modules a fresh interpreter has loaded after running ``code``."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


HEAVY = ("diffusers", "transformers", "matplotlib", "isa_plugin.calibration", "isa_plugin.profile", "isa_plugin.adapters",
         "imageio", "safetensors")


def test_import_is_light():
    """``import isa_plugin`` loads nothing heavy; the core names load torch and the core only."""
    mods = _fresh_modules("import isa_plugin")
    assert not [m for m in HEAVY + ("torch",) if m in mods]
    mods = _fresh_modules("import isa_plugin; isa_plugin.ISAConfig; isa_plugin.Layout; isa_plugin.isa_attention")
    assert "torch" in mods
    assert not [m for m in HEAVY if m in mods]


def test_cli_help_does_not_import_torch():
    mods = _fresh_modules("import sys; sys.argv = ['isa', '--help']\nfrom isa_plugin import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in mods and "diffusers" not in mods


def test_lazy_names_resolve_to_their_homes():
    from isa_plugin.adapters.install import apply_isa
    from isa_plugin.profile import ThresholdProfile

    assert isa_plugin.apply_isa is apply_isa and isa_plugin.ThresholdProfile is ThresholdProfile
    try:
        isa_plugin.not_a_name
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:  # pragma: no cover
        raise AssertionError("unknown attribute did not raise")
