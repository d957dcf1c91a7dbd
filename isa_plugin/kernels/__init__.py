"""ISA kernels: Triton implementations and the pure-PyTorch reference they are tested against."""

from .reference import ISAPlan, dense_attention_reference, isa_attention_reference

__all__ = ["ISAPlan", "dense_attention_reference", "isa_attention_reference"]
