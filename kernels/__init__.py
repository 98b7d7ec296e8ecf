"""Attention kernels: `reference` (plain torch, the CPU path and the test oracle) and the CUDA ones.

Kept import-light on purpose: importing this package must not pull in torch or CuPy.
"""
