"""One implementation each of what issue 24 unified, checked by walking slimtorch's modules (as test_structure.py
does for import cycles): a second copy fails here, with where it is."""
import ast
from pathlib import Path
from typing import Iterator, List, Set

import slimtorch

ROOT = Path(slimtorch.__file__).resolve().parent

# -- the calibration feed loop ------------------------------------------------------------------------------------
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
#: what a callable that runs a network is called in slimtorch (model, self.model, block, module, BlockCall...)
_RUNS_A_NETWORK = ("model", "module", "block", "layer", "wrapper")


def _own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """``node``'s descendants, without entering nested functions (their loops are their own)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, _FUNCTIONS):
            yield from _own_nodes(child)


def _loop_bodies(fn: ast.AST) -> Iterator[ast.AST]:
    """The statements and expressions a loop of ``fn`` repeats (a comprehension's element, not what it iterates)."""
    for node in _own_nodes(fn):
        if isinstance(node, _LOOPS):
            yield from node.body
        elif isinstance(node, _COMPREHENSIONS):
            yield from ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt])
            yield from (cond for gen in node.generators for cond in gen.ifs)


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _feeds_a_batch(call: ast.Call, own_variadics: Set[str]) -> bool:
    """``feed(...)``, or a network called on unpacked data (``model(**inputs)``, ``block(*c.args, **c.kwargs)``)
    other than the calling function's own ``*args`` / ``**kwargs`` handed on."""
    name = _callee(call)
    if name == "feed":
        return True
    unpacked = [a.value for a in call.args if isinstance(a, ast.Starred)] + [
        k.value for k in call.keywords if k.arg is None]
    handed_on = all(isinstance(v, ast.Name) and v.id in own_variadics for v in unpacked)
    return bool(unpacked) and not handed_on and name.lower().endswith(_RUNS_A_NETWORK)


def feed_loops(source: str) -> List[str]:
    """``function:line`` of every loop in ``source`` that feeds batches to a network itself."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        variadics = {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
        for body in _loop_bodies(fn):
            for node in [body, *_own_nodes(body)]:
                if isinstance(node, ast.Call) and _feeds_a_batch(node, variadics):
                    found.append(f"{fn.name}:{node.lineno}")
    return found


def test_one_calibration_feed_loop():
    """quantize's steps, SmoothQuant and the block pipeline (capture, Hessians, static ranges, block outputs) all
    feed batches through passes.feed_batches; a second loop that feeds a model itself fails here."""
    loops = {f"{path.relative_to(ROOT.parent)}:{where}" for path in sorted(ROOT.rglob("*.py"))
             for where in feed_loops(path.read_text())}
    assert [loop.rpartition(":")[0] for loop in loops] == ["slimtorch/quantization/passes.py:feed_batches"], (
        f"loops that feed batches to a model: {sorted(loops)}; feed calibration data through "
        "slimtorch.quantization.passes.feed_batches (its pre/post hooks, input_fn, on_output, StopForward)")
    # the detector finds the loops the block pipeline had before it used feed_batches, and leaves non-feeds alone
    before = '''
def capture(model, batches):
    for i, batch in enumerate(batches):
        inputs = language_model_inputs(model, batch)
        model(**inputs)

def run(block, inputs):
    return [block(*inp.args, **inp.kwargs) for inp in inputs]

def calibrate(model, loader):
    for batch in loader:
        feed(model, batch)

def not_feeds(step, rows, *args, **kwargs):
    for r in rows:
        step(*args, **kwargs)
        print(*r)
        Config(**r)
    return [t for t in outputs(feed(step, rows))]
'''
    assert [w.partition(":")[0] for w in feed_loops(before)] == ["capture", "run", "calibrate"]
