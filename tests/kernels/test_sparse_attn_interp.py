"""Block-sparse plan executor under TRITON_INTERPRET=1 (CPU): the cases live in ``sparse_attn_interp_cases.py``.

Triton picks interpreter or compiled mode when it (and each kernel) is first imported. When the suite
imported triton earlier in this process without TRITON_INTERPRET=1, the cases run in a subprocess with
the variable set; otherwise they are collected here directly.
"""

import os
import subprocess
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_CASES = os.path.join(_HERE, "sparse_attn_interp_cases.py")
_IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules

if torch.cuda.is_available():
    pytest.skip("interpreter tests run where there is no GPU", allow_module_level=True)

if _IN_PROCESS:
    sys.path.insert(0, _HERE)
    from sparse_attn_interp_cases import *  # noqa: E402,F401,F403
else:

    @pytest.mark.interpreter
    def test_sparse_attn_cases_in_subprocess():
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", _CASES],
            env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(_HERE)),
        )
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
