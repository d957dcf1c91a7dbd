"""A pipeline's default ISA (:mod:`isa_plugin.adapters.defaults`): the call arguments tools pass, the guard rails,
and ``compare_edit``'s dense runs on a pipeline that runs ISA by default."""

from __future__ import annotations

import re

import pytest
import torch

from isa_plugin import ISAConfig
from isa_plugin.adapters import is_isa_applied
from isa_plugin.adapters.defaults import ATTENTION_MODES, attention_for_call, attention_kwargs_for, runs_isa_by_default
from isa_plugin.adapters.families.liveditor import LIVEditorLayout, authors_isa
from isa_plugin.pipelines.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def liveditor():
    pipe = build_tiny_pipeline("liveditor")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_authors_settings():
    config, layout = authors_isa()
    assert (config.alpha_s, config.alpha_f, config.alpha_ns) == (1 / 8, 1 / 2, 1 / 16)
    assert (config.sharpness, config.topk_fraction, config.block_size) == ("topk_mass", 1 / 16, 64)
    assert isinstance(layout, LIVEditorLayout) and (layout.blocking, layout.block_size) == ("sequence", config.block_size)


def test_call_arguments_for_tools(liveditor):
    wan = build_tiny_pipeline("wan")
    assert runs_isa_by_default(liveditor) and not runs_isa_by_default(wan)
    assert attention_kwargs_for(liveditor, "dense") == {"attention": "dense"} and attention_kwargs_for(wan, "dense") == {}
    assert ATTENTION_MODES == ("auto", "isa", "dense")
    with pytest.raises(ValueError, match=re.escape("attention='off' is not supported; supported: 'auto', 'isa', 'dense'")):
        attention_kwargs_for(liveditor, "off")
    with pytest.raises(ValueError, match="resolves 'auto'"), attention_for_call(liveditor, "auto", authors_isa):
        pass


def test_a_compiled_transformer_names_the_way_out(liveditor):
    pipe = type(liveditor)(**liveditor.components)
    transformer = pipe.transformer
    transformer._compiled_call_impl = lambda *a, **k: None  # what ModelMixin.compile() leaves on the module
    try:
        with pytest.raises(RuntimeError, match=r"runs ISA by default: .*already compiled.*attention='dense'"), \
                attention_for_call(pipe, "isa", authors_isa):
            pass
        assert not is_isa_applied(pipe)
    finally:
        del transformer._compiled_call_impl


def test_compare_edit_runs_dense_when_asked(liveditor):
    from isa_plugin.evaluate import compare_edit

    video = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    size = dict(height=64, width=64, frames=5, steps=1, seed=3)
    cmp = compare_edit(liveditor, ISAConfig(block_size=16), video, "make it red", **size, warmup=False, repeats=1)
    direct = liveditor(prompt="make it red", video=video, height=64, width=64, num_frames=5, num_inference_steps=1,
                       generator=torch.Generator().manual_seed(3), output_type="np", attention="dense").frames[0]
    assert torch.equal(cmp["dense"].frames, torch.as_tensor(direct).float())
    assert cmp["isa_calls"] > 0 and not is_isa_applied(liveditor)  # ISA applied for its runs only
