"""The README's Python snippets run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(code, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets may write reports under runs/
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
