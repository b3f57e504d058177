"""One implementation of each core piece of the library (issue 24, acceptance 1): the modules are walked (AST) and a
second implementation outside the piece's home module fails the test. Each piece has its own section and checker.
"""
import ast
import re
from pathlib import Path
from typing import Iterator, List, Set

import slimtorch

ROOT = Path(slimtorch.__file__).resolve().parent


def _sources(root: Path = ROOT):
    """``(dotted module name, source)`` of every module under ``root`` (a slimtorch package directory)."""
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path.read_text()


# -- one quantization grid: int8/int4 qparams, rounding onto the grid, per-token fake quantization ----------------
GRID_MODULE = "slimtorch.quantization.grid"
#: divisors that turn a range into a scale: int4 / int8 / uint8 / FP8 E4M3 spans (either int8 rule)
GRID_DIVISORS = {7.5, 127, 127.5, 255, 448}
#: names of grid bounds: a division by one of them is a scale formula
GRID_BOUND_NAME = re.compile(r"q_?max|q_?min|quant_max|quant_min|half_range|bit_range", re.IGNORECASE)
#: functions that sound like a grid (qparams, per-token or fake quantization); one that divides is one
GRID_FUNCTION_NAME = re.compile(r"qparams|per_token|fake_quant|quantize_to_grid|round_to_grid", re.IGNORECASE)


def _names_in(node: ast.AST) -> List[str]:
    return [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, (ast.Name, ast.Attribute))]


def _divisions(tree: ast.AST):
    """``(node, divisor)`` of every true division (``a / b`` and ``a /= b``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            yield node, node.right
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Div):
            yield node, node.value


def _is_rounding(node: ast.AST) -> bool:
    """``torch.round(a / b)`` or ``(a / b).round()``: rounding a quotient, the heart of quantize."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("round", "round_")):
        return False
    operand = node.args[0] if node.args else node.func.value
    return isinstance(operand, ast.BinOp) and isinstance(operand.op, ast.Div)


def grid_implementations(module: str, source: str) -> List[str]:
    """Where ``source`` computes quantization-grid math itself: a scale from a range (a division by a grid span or
    bound), rounding a quotient, the float32 eps of the scales, or a qparams / per-token / fake-quant function that
    divides. ONNX graph writers (``g.op("Div", ...)``) are not Python divisions: tests/export checks them against
    the grid bit for bit."""
    tree = ast.parse(source)
    found = []
    for node, divisor in _divisions(tree):
        constant = isinstance(divisor, ast.Constant) and divisor.value in GRID_DIVISORS
        bound = [n for n in _names_in(divisor) if GRID_BOUND_NAME.search(n)]
        if constant or bound:
            found.append(f"{module}:{node.lineno} divides by {ast.unparse(divisor)} (a scale formula)")
    for node in ast.walk(tree):
        if _is_rounding(node):
            found.append(f"{module}:{node.lineno} rounds a quotient ({ast.unparse(node)})")
        if isinstance(node, ast.Attribute) and node.attr == "eps" and "finfo" in ast.unparse(node.value):
            found.append(f"{module}:{node.lineno} defines a scale eps ({ast.unparse(node)})")
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and GRID_FUNCTION_NAME.search(node.name)
                and any(True for _ in _divisions(node))):
            found.append(f"{module}:{node.lineno} {node.name}() computes a grid")
    return found


def test_the_grid_checker_sees_a_second_grid():
    """Snippets of the two grids slimtorch had before quantization/grid.py (primitives.py, llm/grid.py, w8a8.py)."""
    second = {
        "amax / 127": "def choose(lo, hi):\n    return torch.maximum(-lo, hi) / SYMMETRIC_INT8_QMAX\n",
        "amax / 127.5": "s = torch.clamp(amax.to(torch.float32) / 127.5, min=1e-7)\n",
        "group span": "scale = torch.maximum(-lo, hi) / ((grid.qmax - grid.qmin) / 2)\n",
        "method span": "class F:\n    def scale(self, amax):\n        return amax / self.half_range\n",
        "rounding": "q = torch.clamp(torch.round(x / s) + z, -128, 127)\n",
        "eps": "SCALE_EPS = torch.finfo(torch.float32).eps\n",
        "per-token": "def per_token_fake_quantize(x, fmt):\n    y = x / fmt.scale(x.abs().amax(-1))\n"
                     "    return y.round_() * 2\n",
    }
    for what, source in second.items():
        assert grid_implementations("m", source), what
    # what callers of the grid do is not flagged
    caller = ("def _fake_quantized(w, grid):\n    q, s, z = quantize_rtn(w, grid)\n"
              "    return dequantize_groups(q, s, z)\n"
              "ratio = top[:, n] / top[:, n - 1].clamp_min(torch.finfo(torch.float32).tiny)\n"
              "mean = total / count\n")
    assert grid_implementations("m", caller) == []


def test_one_quantization_grid():
    """Every int4/int8/FP8 scale, rounding onto a grid and per-token fake quantization lives in
    slimtorch/quantization/grid.py; every other module calls it."""
    sources = dict(_sources())
    assert GRID_MODULE in sources and len(sources) > 40
    assert grid_implementations(GRID_MODULE, sources[GRID_MODULE])  # the checker sees the grid where it is
    elsewhere = [hit for module, source in sources.items() if module != GRID_MODULE
                 for hit in grid_implementations(module, source)]
    assert elsewhere == [], "second quantization grid outside slimtorch/quantization/grid.py:\n" + "\n".join(elsewhere)


# -- one N:M mask selection: top/bottom k within groups of M lives in pruning/masks.py ----------------------------
NM_SELECTION_HOME = ROOT / "pruning" / "masks.py"
_NM_SELECTIONS = {"topk", "kthvalue", "sort", "argsort", "msort", "lowest_k"}
_NM_VIEWS = {"reshape", "view", "unflatten", "unfold"}


def _called_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _mentions_group_size(node: ast.AST) -> bool:
    """Whether an expression names an N:M group size: ``pattern.m``, ``m`` or ``M``."""
    return any((isinstance(n, ast.Attribute) and n.attr == "m") or (isinstance(n, ast.Name) and n.id in ("m", "M"))
               for n in ast.walk(node))


def nm_selections_in(source: str, filename: str) -> List[str]:
    """``file:line function`` of every function that both views a tensor as groups of M and selects within it."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [c for c in ast.walk(fn) if isinstance(c, ast.Call)]
        grouped = any(_called_name(c) in _NM_VIEWS and any(_mentions_group_size(a) for a in c.args) for c in calls)
        selects = any(_called_name(c) in _NM_SELECTIONS for c in calls)
        if grouped and selects:
            found.append(f"{filename}:{fn.lineno} {fn.name}")
    return found


def test_nm_mask_selection_lives_only_in_pruning_masks():
    outside = [hit for path in sorted(ROOT.rglob("*.py")) if path != NM_SELECTION_HOME
               for hit in nm_selections_in(path.read_text(), str(path.relative_to(ROOT.parent)))]
    assert not outside, (f"N:M mask selection outside slimtorch/pruning/masks.py: {outside}; choose masks with "
                         "masks.nm_keep / masks.nm_mask instead of a second top-k over groups of M")
    assert nm_selections_in(NM_SELECTION_HOME.read_text(), "masks.py"), "the heuristic no longer finds masks.py's own"


def test_nm_selection_heuristic_tells_selection_from_checking():
    second_copy = '''
def mask_lowest(scores, target):
    groups = scores.reshape(out, inp // target.m, target.m)
    return torch.topk(groups, target.m - target.n, dim=2, largest=False).indices
'''
    checking_only = '''
def holds(nonzero, pattern):
    return bool((nonzero.reshape(-1, pattern.m).sum(dim=1) <= pattern.n).all())
'''
    assert nm_selections_in(second_copy, "x.py") == ["x.py:2 mask_lowest"]
    assert nm_selections_in(checking_only, "x.py") == []


# -- one calibration feed loop: batches reach a model in passes.feed_batches only -------------------------------
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
