"""Benchmarks: `zoo bench speed` (kernels against softmax attention) and `zoo bench quality` (leaderboard)."""


def split_names(values: list[str] | None) -> list[str] | None:
    """`--mixers` values (names or comma lists) -> the names in order, each once; None stays None."""
    if values is None:
        return None
    return list(dict.fromkeys(name.strip() for v in values for name in v.split(",") if name.strip()))
