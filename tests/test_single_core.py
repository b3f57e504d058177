"""One implementation of each core piece of math (issue 24): a second one appearing elsewhere fails here.

N:M mask selection: choosing the top or bottom k of each group of M weights (``topk`` / ``kthvalue`` / ``sort`` /
``argsort`` / ``lowest_k`` in a function that views a tensor as groups of M, ``reshape(..., m)``) lives only in
slimtorch/pruning/masks.py; SparseGPT, Wanda, magnitude one-shot pruning and the training-time pruner call it.
"""
import ast
from pathlib import Path
from typing import List

import slimtorch

ROOT = Path(slimtorch.__file__).resolve().parent

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
