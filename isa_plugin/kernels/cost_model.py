"""Kernel cost model: predicted time of one ISA call from its pair counts (``cost_model.json``).

``ms = max(host_floor_ms, ms_per_call + ms_per_gexact_pair * E + ms_per_gapprox_pair * A)``, with E and A
the exact and approximated pairs in units of 1e9 (summed over batch and heads, scaled by head_dim/128).
The coefficients are fitted per card by ``benchmarks/bench_attention.py --cost-model``; the file's
``doc`` entry describes every field.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

__all__ = ["load_cost_model", "predict_ms", "dense_ms"]

_PATH = os.path.join(os.path.dirname(__file__), "cost_model.json")


def load_cost_model(card: Optional[str] = None, path: str = _PATH) -> Dict[str, float]:
    """Coefficients for ``card`` (a torch.cuda.get_device_name string); the first card when None or unknown."""
    with open(path) as f:
        cards = json.load(f)["cards"]
    if card in cards:
        return cards[card]
    return next(iter(cards.values()))


def predict_ms(exact_pairs: float, approx_pairs: float, head_dim: int = 128, card: Optional[str] = None) -> float:
    """Predicted ms of one ISA call with ``exact_pairs`` / ``approx_pairs`` (token pairs, all heads)."""
    c = load_cost_model(card)
    s = head_dim / 128.0 / 1e9
    t = c["ms_per_call"] + c["ms_per_gexact_pair"] * exact_pairs * s + c["ms_per_gapprox_pair"] * approx_pairs * s
    return max(c.get("host_floor_ms", 0.0), t)


def dense_ms(n_query: int, n_key: int, heads: int, batch: int = 1, head_dim: int = 128, card: Optional[str] = None) -> float:
    """Predicted ms of dense cuDNN attention for the same problem (for keep-dense decisions)."""
    c = load_cost_model(card)
    return c["dense_cudnn_ms_per_gpair"] * n_query * n_key * heads * batch * head_dim / 128.0 / 1e9
