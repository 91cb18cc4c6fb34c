"""What the Triton kernels' source must never do, whichever machine compiles them."""

import ast
from pathlib import Path

import tq_vllm.kernels

KERNELS = Path(tq_vllm.kernels.__path__[0])


def test_every_masked_load_names_its_other_value():
    """A masked tl.load without other= leaves masked lanes undefined on a GPU (the interpreter
    happens to give 0): a 0 weight times a NaN there is NaN."""
    bare = []
    for path in sorted(KERNELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if not (call and node.func.attr == "load" and ast.unparse(node.func.value) == "tl"):
                continue
            keywords = {k.arg for k in node.keywords}
            if "mask" in keywords and "other" not in keywords:
                bare.append(f"{path.relative_to(KERNELS)}:{node.lineno}")
    assert not bare, f"masked tl.load without other=: {bare}"
