"""The Python blocks of the docs run as written, in order, sharing one namespace per page."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["quickstart.md", "config.md", "quantization.md", "huggingface.md", "llm.md", "slimming.md"]


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (plots, exports)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"{page} has no python block"
    namespace = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
    out = capsys.readouterr().out
    if page == "quickstart.md":
        assert "did you mean 'end_step'" in out
