"""Kernel ≈ reference properties under the Triton interpreter; the cases live in ``kernel_property_cases.py``.

Triton picks interpreter or compiled mode when a kernel is decorated, and other tests of a session (for
example ``torch.compile`` through Inductor) may use triton compiled. Unless TRITON_INTERPRET=1 was set
for the whole session, the cases run in a subprocess with the variable set.
"""

import os
import subprocess
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_CASES = os.path.join(_HERE, "kernel_property_cases.py")

if torch.cuda.is_available():
    pytest.skip("interpreter tests run where there is no GPU", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.path.insert(0, _HERE)
    from kernel_property_cases import *  # noqa: E402,F401,F403
else:

    @pytest.mark.interpreter
    def test_kernel_properties_in_interpreter_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rxX", _CASES],
            env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(_HERE)),
        )
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        print(r.stdout[-2000:])
