"""Compute shared by mixers: fp32 loop references, chunked PyTorch forms, recurrent steps; Triton
kernels (triton/) and flash-linear-attention adapters (fla_backend.py) for the GPU, chosen per
device by dispatch.py, which the mixers call.

Imports flow one way: kernels <- mixers <- transfer <- the rest of zoo. A kernel knows no mixer.
"""
