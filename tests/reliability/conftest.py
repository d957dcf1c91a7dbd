"""Fixtures of the reliability tests; the helpers live in ``rel_helpers``."""

import types

import pytest

import rel_helpers


@pytest.fixture
def tiny():
    """Builders of a tiny Wan transformer and its inputs (skips without diffusers)."""
    pytest.importorskip("diffusers")
    h = rel_helpers
    return types.SimpleNamespace(EXACT=h.EXACT, SPARSE=h.SPARSE, wan=h.tiny_wan, wan_inputs=h.wan_inputs, run=h.run)
