"""Compiled Triton refuses a @triton.jit function that reads a module global which is not a
tl.constexpr (NameError: "Cannot access global variable ... from within @jit'ed function");
the interpreter, which CI runs, reads any global. This test finds such reads statically, so
the mistake cannot wait for a GPU to show."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "triton_qat" / "kernels"


def _is_jit(node: ast.FunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def _plain_globals(tree: ast.Module) -> set[str]:
    """Module-level names bound to a value that is not a tl.constexpr (numbers, tuples, ...)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value, annotation = node.targets, node.value, None
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value, annotation = [node.target], node.value, node.annotation
        else:
            continue
        constexpr = "constexpr" in ast.unparse(annotation or value)
        if constexpr:
            continue
        for t in targets:
            if isinstance(t, ast.Name):
                names.add(t.id)
    return names


def _local_names(fn: ast.FunctionDef) -> set[str]:
    local = {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    return local


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_jit_functions_read_only_constexpr_globals(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    plain = _plain_globals(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            local = _local_names(node)
            body = ast.Module(body=node.body, type_ignores=[])  # not the decorators
            for sub in ast.walk(body):
                if (
                    isinstance(sub, ast.Name)
                    and isinstance(sub.ctx, ast.Load)
                    and sub.id in plain
                    and sub.id not in local
                ):
                    bad.append(f"{node.name}:{sub.lineno} reads {sub.id}")
    assert not bad, f"{path.name}: jit code reads non-constexpr globals: {bad}"


def _constexpr_globals(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and "constexpr" in ast.unparse(node.annotation)
        ):
            names.add(node.target.id)
    return names


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_jit_functions_negate_floats_with_negate(path):
    """Triton 3.6 compiles `-x` on a float tensor as 0 - x, so -(+0.0) is +0.0 there (3.7 on
    flip the sign bit). Kernels call rounding.negate instead; `-` stays for literals and
    constexpr globals, which Python negates."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = _constexpr_globals(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            body = ast.Module(body=node.body, type_ignores=[])
            for sub in ast.walk(body):
                if not (isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.USub)):
                    continue
                operand = sub.operand
                if isinstance(operand, ast.Constant):
                    continue
                if isinstance(operand, ast.Name) and operand.id in constants:
                    continue
                bad.append(f"{node.name}:{sub.lineno} {ast.unparse(sub)}")
    assert not bad, f"{path.name}: unary minus in jit code (use negate): {bad}"
