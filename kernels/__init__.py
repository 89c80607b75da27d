"""Triton kernels of lowrank, installed as ``lowrank.kernels``.

This file imports nothing on purpose: importing the package must never import triton, initialise CUDA or shadow
Hugging Face's top-level ``kernels`` package (this folder only exists as ``lowrank.kernels`` once installed).
"""
