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
