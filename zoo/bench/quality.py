"""Placeholder: being written (the CLI imports add_arguments and main from here)."""


def add_arguments(parser) -> None:
    pass


def main(args) -> int:
    raise NotImplementedError("not written yet")
