"""Nothing in the repository root shadows an installed distribution.

Anything started from the root (pytest, `python -c`, a script) has the root on sys.path. The
top-level `kernels/` folder is installed as `rlvr_fast.kernels`; as a plain `kernels` it used to
win over Hugging Face's `kernels` distribution, which transformers imports when it loads a model.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_from_root(code: str, site: Path | None = None, *flags: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter started from the repository root (root first on sys.path),
    with `site` (a folder of fake distributions) next on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def fake_distribution(site: Path, name: str) -> None:
    """A regular package `name` whose import sets a marker."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("MARKER = 'the installed one'\n")


@pytest.mark.parametrize("name", ["kernels", "bench", "csrc"])
def test_installed_distribution_wins_over_the_top_level_folder(tmp_path, name):
    assert (ROOT / name).is_dir()
    fake_distribution(tmp_path, name)
    out = run_from_root(f"""
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]   # the root is first, as in pytest / python -c
        import {name}
        print({name}.MARKER, {name}.__file__)
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the installed one"), out.stdout
    assert str(tmp_path) in out.stdout


def test_rlvr_fast_kernels_still_imports_beside_an_installed_kernels(tmp_path):
    fake_distribution(tmp_path, "kernels")
    out = run_from_root("""
        import kernels
        import rlvr_fast.kernels as K
        assert kernels.MARKER == "the installed one"
        assert K.__name__ == "rlvr_fast.kernels" and callable(K.fused_linear_grpo_loss)
        import sys
        assert sys.modules["kernels"] is kernels
        print("ok")
    """, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_no_installed_kernels_fails_like_a_missing_module():
    """`-S`: no site-packages, so no `kernels` distribution anywhere; only the root and the stdlib."""
    out = run_from_root("""
        try:
            import kernels
        except ModuleNotFoundError as exc:
            print("missing", exc.name)
        else:
            print("imported", kernels.__file__)
    """, None, "-S")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing kernels"
