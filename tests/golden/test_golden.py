"""Behaviour pinned bit for bit: reference and executor outputs, and calibrated profiles (see ``cases.py``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cases import DATA, PROFILE_RUNS, calibrate_profile, digest, profile_content, reference_outputs

HERE = os.path.dirname(os.path.abspath(__file__))


def _compare(got, name):
    want = json.loads((DATA / name).read_text())
    assert sorted(got) == sorted(want)
    bad = {k: (got[k]["sum"], want[k]["sum"]) for k in want if got[k] != want[k]}
    assert not bad, f"outputs changed (case: (sum now, sum recorded)): {bad}"


def test_reference_outputs_unchanged():
    _compare(digest(reference_outputs()), "reference.json")


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run where there is no GPU")
def test_executor_outputs_unchanged(tmp_path):
    out = tmp_path / "executors.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(HERE, "cases.py"), "executors", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _compare(json.loads(out.read_text()), "executors.json")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROFILE_RUNS))
def test_calibrated_profile_unchanged(name, tmp_path_factory):
    work = tmp_path_factory.getbasetemp() / "golden_profiles"
    work.mkdir(exist_ok=True)
    doc, tensors = profile_content(calibrate_profile(name, work))
    want_doc, want_tensors = profile_content(DATA / f"{name}.yaml")
    assert doc == want_doc
    assert sorted(tensors) == sorted(want_tensors)
    for k, t in want_tensors.items():
        assert torch.equal(tensors[k], t), k
