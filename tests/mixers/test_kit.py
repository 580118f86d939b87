"""The mixer kit: Tokens (mask, positions, padding), positions through `counts_tokens`, test options checked
when a class is made, and the layout rules (no mixer file imports another, no private imports, no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from mixer_testing import check_padding_adds_nothing, check_split_and_carry, make_test_mixer

import zoo.mixers
from zoo.mixers import Mixer, Option, Tokens, get_mixer, list_mixers, register_mixer, unregister_mixer
from zoo.mixers.hedgehog import HedgehogMixer
from zoo.mixers.tokens import CountedState

ZOO = Path(zoo.mixers.__file__).parents[1]
#: the mixers package's building blocks: they register no mixer, and any mixer file may import them
SHARED = {"base", "options", "tokens", "features", "feature_map", "gated", "hybrid", "delta_base"}


def test_tokens_give_positions_counting_real_tokens_only():
    q = torch.zeros(2, 4, 5, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    tokens = Tokens.of(q, torch.zeros(2, 5, 3), mask, seen=torch.tensor([0, 7]))
    real = mask.bool()
    assert tokens.positions[real].tolist() == [0, 1, 2, 7, 8, 9]
    assert tokens.seen_after.tolist() == [3, 10] and torch.equal(tokens.real, real)
    plain = Tokens.of(q, None, None, seen=torch.tensor([0, 7]))
    assert plain.positions.tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]] and plain.seen_after.tolist() == [
        5,
        12,
    ]
    assert Tokens.whole(q).positions.tolist() == [[0, 1, 2, 3, 4]] * 2
    with pytest.raises(ValueError, match="keeps no token count"):
        _ = Tokens.of(q, None, mask).positions
    with pytest.raises(ValueError, match=r"mask must be \[B, T\] = \(2, 5\), got \(2, 4\)"):
        Tokens.of(q, None, mask[:, :4])


def test_zero_padding_zeroes_padded_tokens_of_any_per_token_tensor():
    q = torch.zeros(2, 4, 3, 8)
    tokens = Tokens.of(q, None, torch.tensor([[1, 0, 1], [1, 1, 1]]))
    gate, feats = -torch.ones(2, 4, 3), torch.ones(2, 4, 3, 6)
    gate0, feats0, none = tokens.zero_padding(gate, feats, None)
    assert none is None and gate0.shape == gate.shape and feats0.shape == feats.shape
    assert (gate0[0, :, 1] == 0).all() and (feats0[0, :, 1] == 0).all()
    assert (gate0[0, :, [0, 2]] == -1).all() and (feats0[1] == 1).all()
    assert Tokens.of(q, None, None).zero_padding(gate, feats) == (gate, feats)  # no mask: untouched
    assert Tokens.of(q, None, None).real.tolist() == [[True] * 3] * 2  # known without a mask or a count


class PositionScaled(HedgehogMixer):
    """hedgehog whose key features grow with the key's position: 1 + (position mod period) times phi(k)."""

    counts_tokens = True
    options = {**HedgehogMixer.options, "period": Option(1024, int, min=1, doc="positions repeat after this")}
    test_options = {"feature_dim": 8, "period": 7}

    def feature_map(self, h, is_query, tokens):
        phi = super().feature_map(h, is_query, tokens)
        return phi if is_query else phi * (1 + tokens.positions % self.config["period"])[:, None, :, None]


class PositionsRestartAtZero(PositionScaled):
    """The broken carry: the count restarts at 0 on every call."""

    def tokens_and_state(self, q, x, state, mask):
        tokens, inner = super().tokens_and_state(q, x, state, mask)
        return Tokens.of(q, x, mask, torch.zeros_like(tokens.seen)), inner


def test_counts_tokens_gives_the_hooks_positions_that_survive_splits_and_padding():
    register_mixer("test-position-scaled")(PositionScaled)
    register_mixer("test-positions-restart")(PositionsRestartAtZero)
    try:
        check_split_and_carry("test-position-scaled")
        check_padding_adds_nothing("test-position-scaled")
        with pytest.raises(AssertionError):
            check_split_and_carry("test-positions-restart")
        m = make_test_mixer("test-position-scaled")
        _, state = m(
            torch.zeros(2, 4, 5, 16),
            torch.zeros(2, 2, 5, 16),
            torch.zeros(2, 2, 5, 16),
            torch.zeros(2, 5, 32),
            mask=torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 1]]),
        )
        assert isinstance(state, CountedState) and state.seen.tolist() == [4, 1]
        assert state.state.S.shape == (2, 2, 16, 16)  # the kernel's own state, once per key/value head
    finally:
        unregister_mixer("test-position-scaled")
        unregister_mixer("test-positions-restart")


def test_test_options_are_checked_when_the_class_is_made():
    with pytest.raises(TypeError, match=r"test_options: unknown option\(s\) \['windw'\]"):

        class Typo(HedgehogMixer):
            test_options = {"windw": 4}

    with pytest.raises(ValueError, match="test_options.feature_dim"):

        class Negative(HedgehogMixer):
            test_options = {"feature_dim": -1}

    assert Mixer.test_options == {} and get_mixer("softmax").test_options == {}


def test_unregister_mixer():
    with pytest.raises(KeyError, match="no mixer named"):
        unregister_mixer("no-such-mixer")


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for each `import` / `from ... import` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def mixer_module_names() -> set[str]:
    """Modules of zoo.mixers that register a built-in mixer."""
    modules = {get_mixer(name).__module__ for name in list_mixers()}
    return {m.rsplit(".", 1)[1] for m in modules if m.startswith("zoo.mixers.")}


def test_no_mixer_file_imports_another_and_shared_modules_register_nothing():
    mixers = mixer_module_names()
    assert mixers and not mixers & SHARED
    for name in mixers:
        for module, _ in imports_of(ZOO / "mixers" / f"{name}.py"):
            sibling = module.removeprefix("zoo.mixers.")
            assert sibling not in mixers, f"zoo/mixers/{name}.py imports the mixer file {module}"


def test_each_mixer_file_is_small():
    for name in mixer_module_names():
        lines = len((ZOO / "mixers" / f"{name}.py").read_text().splitlines())
        assert lines <= 200, f"zoo/mixers/{name}.py has {lines} lines"


def test_no_private_imports_no_cycles_and_kernels_know_no_mixer():
    files = sorted((ZOO / "mixers").glob("*.py")) + sorted((ZOO / "kernels").glob("*.py"))
    graph = {}
    for path in files:
        own = f"zoo.{path.parent.name}.{path.stem}"
        graph[own] = set()
        for module, names in imports_of(path):
            private = [n for n in names if n.startswith("_") and module.startswith("zoo")]
            assert not private, f"{path.name} imports private names {private} from {module}"
            if path.parent.name == "kernels":
                assert not module.startswith("zoo.mixers"), f"kernel {path.name} imports {module}"
            if module.startswith("zoo.mixers.") and module != own:
                graph[own].add(module)
    visiting, done = set(), set()

    def visit(node, trail):
        assert node not in visiting, f"import cycle: {' -> '.join(trail)}"
        if node in done:
            return
        visiting.add(node)
        for nxt in graph.get(node, ()):
            visit(nxt, [*trail, nxt])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [node])
