"""Compute shared by mixers: fp32 loop references, chunked PyTorch forms, recurrent steps.

Imports flow one way: kernels <- mixers <- transfer <- the rest of zoo. A kernel knows no mixer.
"""
