"""The runnable example of kernels/README.md runs as written (CPU, torch paths)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "kernels" / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    match = re.search(r"<!-- example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "kernels/README.md lost its <!-- example --> python block"
    exec(compile(match.group(1), str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "clip_low_frac" in out and "grad norms:" in out
