"""Benchmarks: `zoo bench speed` (kernels against softmax attention) and `zoo bench quality` (leaderboard)."""
