"""The wrapper's modes (zoo.convert): teacher_forced, softmax_teacher and branch, entered only as context
managers that restore the model on exit, also on an exception, and nest."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from zoo_testing import tiny_model

import zoo
from zoo.convert import branch, hybrid_mixers, softmax_teacher, teacher_forced
from zoo.transfer.stage2 import add_lora

ZOO = Path(__file__).resolve().parents[1] / "zoo"
CONVERTED = [0, 2]  # of 3 layers: layer 1 keeps its softmax attention


def teacher_and_student(mixer: str = "hedgehog", **options):
    """A tiny 3-layer teacher and its copy with layers 0 and 2 converted to `mixer`."""
    teacher = tiny_model("llama", num_hidden_layers=3).eval()
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    zoo.linearize(student, mixer, layers=CONVERTED, **options)
    return teacher, student.eval()


def ids(seed: int = 0, shape=(2, 19)) -> torch.Tensor:
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def attention_call(model, layer: int, tokens: torch.Tensor):
    """(args, kwargs, output) of layer `layer`'s attention in one forward of `model` on `tokens`."""
    seen = {}
    attn = model.model.layers[layer].self_attn
    pre = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    post = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    try:
        logits(model, tokens)
    finally:
        pre.remove()
        post.remove()
    return seen["args"], seen["kwargs"], seen["out"]


def test_teacher_forced_records_each_layers_loss_and_passes_the_teachers_output_on():
    teacher, student = teacher_and_student()
    tokens = ids()
    with teacher_forced(student) as losses:
        inside = logits(student, tokens)
    torch.testing.assert_close(inside, logits(teacher, tokens), atol=1e-5, rtol=1e-5)
    assert sorted(losses) == CONVERTED and all(loss.ndim == 0 and loss > 0 for loss in losses.values())
    for layer in CONVERTED:
        # the loss is the MSE between the mixer's output and the teacher's, both from the teacher's input
        args, kwargs, teacher_out = attention_call(teacher, layer, tokens)
        with torch.no_grad():
            mixer_out = student.model.layers[layer].self_attn(*args, **kwargs)[0]
        expected = (mixer_out - teacher_out).pow(2).mean()
        torch.testing.assert_close(losses[layer], expected, atol=1e-7, rtol=1e-4, msg=f"layer {layer}")


def test_teacher_forced_losses_train_only_the_mixers():
    _, student = teacher_and_student()
    with teacher_forced(student) as losses:
        student(input_ids=ids(), use_cache=False)
    torch.stack(list(losses.values())).sum().backward()
    grads = {name for name, p in student.named_parameters() if p.grad is not None}
    assert grads and all(".mixer." in name for name in grads)


def test_teacher_forced_losses_are_those_of_the_latest_forward():
    _, student = teacher_and_student()
    with teacher_forced(student) as fresh:
        logits(student, ids(1))
    expected = {layer: loss.clone() for layer, loss in fresh.items()}
    with teacher_forced(student) as losses:
        logits(student, ids(0))
        losses[99] = torch.tensor(1.0)  # emptied when the next forward starts
        logits(student, ids(1))
        assert sorted(losses) == CONVERTED
        for layer in CONVERTED:
            torch.testing.assert_close(losses[layer], expected[layer], atol=0, rtol=0)


def test_after_teacher_forced_the_model_is_itself_again_also_after_an_exception():
    _, student = teacher_and_student()
    tokens = ids()
    own = logits(student, tokens)
    with teacher_forced(student) as losses:
        logits(student, tokens)
    torch.testing.assert_close(logits(student, tokens), own, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), teacher_forced(student) as losses:
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(student, tokens), own, atol=0, rtol=0)
    assert losses == {}
    hooks = student._forward_pre_hooks
    assert not hooks  # the hook that empties the losses is gone too


def test_softmax_teacher_is_the_unconverted_teacher_and_restores_the_student():
    teacher, student = teacher_and_student("gated-delta")
    tokens = ids()
    own, expected = logits(student, tokens), logits(teacher, tokens)
    assert (own - expected).abs().max() > 1e-3
    with softmax_teacher(student) as model:
        assert model is student
        torch.testing.assert_close(logits(student, tokens), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(student, tokens), own, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), softmax_teacher(student):
        raise RuntimeError("boom")
    torch.testing.assert_close(logits(student, tokens), own, atol=0, rtol=0)


def test_modes_nest_and_each_gets_the_outer_one_back():
    teacher, student = teacher_and_student()
    tokens = ids()
    own, expected = logits(student, tokens), logits(teacher, tokens)
    with softmax_teacher(student):
        with teacher_forced(student) as losses:
            torch.testing.assert_close(logits(student, tokens), expected, atol=1e-5, rtol=1e-5)
        assert sorted(losses) == CONVERTED
        with teacher_forced(student) as outer, teacher_forced(student) as inner:
            logits(student, tokens)
        assert sorted(inner) == CONVERTED and outer == {}  # the innermost records
        torch.testing.assert_close(logits(student, tokens), expected, atol=1e-5, rtol=1e-5)  # softmax again
        losses.clear()
        logits(student, tokens)
        assert losses == {}  # the closed teacher_forced records no more
    torch.testing.assert_close(logits(student, tokens), own, atol=0, rtol=0)


def test_modes_reach_the_layers_through_a_peft_wrapper():
    teacher, student = teacher_and_student()
    wrapped = add_lora(student, rank=4, alpha=8)  # LoRA B starts at zero: the projections are the teacher's
    tokens = ids()
    own, expected = logits(wrapped, tokens), logits(teacher, tokens)
    with teacher_forced(wrapped) as losses:
        torch.testing.assert_close(logits(wrapped, tokens), expected, atol=1e-5, rtol=1e-5)
    assert sorted(losses) == CONVERTED
    with softmax_teacher(wrapped):
        torch.testing.assert_close(logits(wrapped, tokens), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(wrapped, tokens), own, atol=0, rtol=0)


def test_teacher_forced_works_on_a_wrapper_alone():
    """One converted layer outside a model (as zoo.scale.model_costs builds one): its losses are recorded."""
    _, student = teacher_and_student()
    args, kwargs, _ = attention_call(student, 0, ids())
    wrapper = student.model.layers[0].self_attn
    with teacher_forced(wrapper) as losses:
        wrapper(*args, **kwargs)
    assert list(losses) == [0]


def test_modes_need_a_converted_layer():
    plain = tiny_model("llama")
    for mode in (teacher_forced(plain), softmax_teacher(plain)):
        with pytest.raises(ValueError, match="no converted layer"), mode:
            pass
    assert not plain._forward_pre_hooks


def window_alone(model):
    """`model`'s copy whose hybrids give their window branch all the weight (a = 1, b = 0): the window
    branch alone, without the branch switch."""
    alone = copy.deepcopy(model)
    with torch.no_grad():
        for mixer in hybrid_mixers(alone):
            mixer.window_logit.fill_(100.0)  # sigmoid(100) is 1.0 in float32
    return alone


def test_branch_runs_the_window_alone_and_restores_the_hybrid_nested():
    _, student = teacher_and_student("lolcats", window=4)
    tokens = ids(shape=(2, 24))
    both = logits(student, tokens)
    with branch(student, "window"):
        window = logits(student, tokens)
        assert {m.branch for m in hybrid_mixers(student)} == {"window"}
        with branch(student, "linear"):
            linear = logits(student, tokens)
        torch.testing.assert_close(logits(student, tokens), window, atol=0, rtol=0)
    torch.testing.assert_close(window, logits(window_alone(student), tokens), atol=1e-6, rtol=1e-5)
    assert (window - both).abs().max() > 1e-4 and (linear - both).abs().max() > 1e-4
    assert {m.branch for m in hybrid_mixers(student)} == {"both"}
    torch.testing.assert_close(logits(student, tokens), both, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), branch(student, "linear"):
        raise RuntimeError("boom")
    assert {m.branch for m in hybrid_mixers(student)} == {"both"}


def test_branch_refuses_what_the_model_does_not_have():
    _, hybrid = teacher_and_student("lolcats", window=4)
    with pytest.raises(ValueError, match="branch must be one of"), branch(hybrid, "neither"):
        pass
    assert {m.branch for m in hybrid_mixers(hybrid)} == {"both"}
    _, plain = teacher_and_student("hedgehog")
    with pytest.raises(ValueError, match="no hybrid mixer"), branch(plain, "window"):
        pass
    tokens = ids()
    own = logits(plain, tokens)
    with branch(plain, "both"):  # every mixer runs as it is: nothing to switch
        torch.testing.assert_close(logits(plain, tokens), own, atol=0, rtol=0)


MODE_ATTRIBUTES = {"_mode", "transfer", "softmax", "transfer_losses", "branch"}


def assigned_attributes(tree: ast.AST):
    """(line, owner source, attribute) of every attribute assigned, deleted or setattr'd in `tree`."""
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            yield node.lineno, ast.unparse(node.args[0]), node.args[1].value
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute):
                    yield part.lineno, ast.unparse(part.value), part.attr


def test_only_the_wrappers_module_sets_the_modes():
    """No module of zoo but zoo/convert.py sets a mode flag or reads the wrapper's private mode; a hybrid
    mixer may set its own default branch (`self.branch`)."""
    offenders = []
    for path in sorted(ZOO.rglob("*.py")):
        relative = path.relative_to(ZOO.parent).as_posix()
        if relative == "zoo/convert.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, owner, attr in assigned_attributes(tree):
            own_branch = attr == "branch" and owner == "self" and relative.startswith("zoo/mixers/")
            if attr in MODE_ATTRIBUTES and not own_branch:
                offenders.append(f"{relative}:{line} sets {owner}.{attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("_mode", "_zoo_context"):
                offenders.append(f"{relative}:{node.lineno} uses .{node.attr}")
    assert not offenders, "\n".join(offenders)
