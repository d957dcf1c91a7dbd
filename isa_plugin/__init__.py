"""isa-plugin: In-context Sparse Attention (ISA) for in-context video editing pipelines in diffusers."""

from .adapters.base import apply_isa, remove_isa, stats
from .calibration.fit import fit_profile
from .attention import ISAInfo, isa_attention
from .config import ISAConfig
from .layout import Layout
from .profile import ThresholdProfile

__version__ = "0.1.0"

__all__ = ["Layout", "ISAConfig", "ISAInfo", "isa_attention", "apply_isa", "remove_isa", "stats", "ThresholdProfile", "fit_profile", "__version__"]
