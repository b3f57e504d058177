"""Every install line the README, docs, examples and error messages show names extras that pyproject.toml defines,
from the checkout: slimtorch is not on PyPI, so ``pip install "slimtorch[onnx]"`` would fetch nothing (or a
stranger's package)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the keys of [project.optional-dependencies] (tomllib is not in Python 3.10's standard library)
_OPTIONAL = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
EXTRAS = set(re.findall(r"^([a-z0-9_-]+) = \[", _OPTIONAL, flags=re.M))


def texts():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
             *sorted((ROOT / "slimtorch").rglob("*.py"))]
    return {str(f.relative_to(ROOT)): f.read_text() for f in files}


def test_no_install_hint_names_slimtorch_on_the_registry():
    wrong = {name: re.findall(r"pip install[^\n]*slimtorch\[", text) for name, text in texts().items()}
    assert not {name: found for name, found in wrong.items() if found}


def test_every_extra_an_install_line_names_exists():
    named = {}
    for name, text in texts().items():
        for group in re.findall(r"pip install -e ['\"]\.\[([a-z0-9_,-]+)\]['\"]", text):
            named.setdefault(name, set()).update(group.split(","))
    assert {"examples", "onnx", "hf", "deepspeed", "llm"} <= set().union(*named.values())  # the README names all
    unknown = {name: sorted(extras - EXTRAS) for name, extras in named.items() if extras - EXTRAS}
    assert not unknown, f"extras pyproject.toml does not define: {unknown}"
