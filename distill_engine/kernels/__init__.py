"""Triton kernels and their launchers (one module per op).

Modules here import Triton at import time; import them lazily from ``ops/`` so
the package still imports on machines without Triton.
"""
