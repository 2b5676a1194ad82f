"""Fused kernels for NPT layers."""
from .modulated_swiglu import modulated_gate, modulated_swiglu, modulated_swiglu_reference, modulation_factor

__all__ = ["modulated_gate", "modulated_swiglu", "modulated_swiglu_reference", "modulation_factor"]
