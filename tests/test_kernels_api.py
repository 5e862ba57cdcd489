"""Package-level behaviour of rlvr_fast.kernels: dispatch, logging, and life without triton."""

import importlib
import inspect
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rlvr_fast.kernels as K
from rlvr_fast.kernels import _common


def _documented_functions() -> list[tuple[str, str, list[str]]]:
    """(file, function, parameter names) of every `name(params)` row in kernels/README.md's tables."""
    readme = (Path(__file__).resolve().parent.parent / "kernels" / "README.md").read_text()
    out = []
    for row in re.finditer(r"^\| (`.*?) \| `(\w+)\.py` \|", readme, flags=re.M):
        for name, params in re.findall(r"`(\w+)\((.*?)\)`", row.group(1)):
            names = [p.split("=")[0].strip() for p in params.split(",")]
            out.append((row.group(2), name, [n for n in names if n.isidentifier()]))
    return out


def test_readme_tables_match_the_code():
    """Each function in kernels/README.md's tables exists in the file the table names, with the parameters
    the table lists; the exported ones (the first table) are in `__all__` and importable from the package."""
    documented = _documented_functions()
    assert len(documented) >= 10, documented
    for file, name, params in documented:
        fn = getattr(importlib.import_module(f"rlvr_fast.kernels.{file}"), name)
        missing = set(params) - set(inspect.signature(fn).parameters)
        assert not missing, f"kernels/README.md documents {name}({', '.join(sorted(missing))}) that it does not take"
    exported = {"token_logprobs", "linear_token_logprobs", "grpo_loss", "fused_linear_grpo_loss"}
    assert exported <= {name for _, name, _ in documented} and exported <= set(K.__all__)
    for name in K.__all__:
        assert getattr(K, name) is not None, name


def test_dispatch_logs_once_per_op_and_backend(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    x, y = torch.randn(3, 7), torch.randint(0, 7, (3,))
    with caplog.at_level(logging.INFO, logger="rlvr_fast.kernels"):
        for _ in range(2):
            K.token_logprobs(x, y)                    # auto on CPU -> torch
            K.token_logprobs(x, y, backend="triton")  # interpreter (tests only)
    msgs = [r.getMessage() for r in caplog.records if r.name == "rlvr_fast.kernels"]
    assert msgs == ["token_logprobs: using the torch backend (cpu tensors)",
                    "token_logprobs: using the triton backend (cpu tensors)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only dispatch check")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        K.token_logprobs(torch.randn(3, 7), torch.randint(0, 7, (3,)), backend="triton")


def test_runs_without_triton_installed():
    """Block `import triton` in a fresh interpreter: the package imports and its CPU paths work."""
    code = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton blocked for this test")
        sys.meta_path.insert(0, NoTriton())
        import torch
        import rlvr_fast.kernels as K
        from rlvr_fast.kernels import reference as R
        assert not K.HAS_TRITON and "triton" not in sys.modules
        h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        y = torch.randint(0, 11, (2, 3))
        lp = K.linear_token_logprobs(h, w, y.view(-1))
        torch.testing.assert_close(lp, R.linear_token_logprobs_ref(h, w, y.view(-1)))
        torch.testing.assert_close(K.token_logprobs(h @ w.T, y.view(-1)), lp)
        mask, adv = torch.ones(2, 3), torch.tensor([1.0, -1.0])
        loss, stats = K.fused_linear_grpo_loss(h, w, y, None, lp.detach().view(2, 3), adv, mask)
        loss.backward()
        loss2, _ = K.grpo_loss(lp.view(2, 3), None, lp.detach().view(2, 3), adv, mask)
        torch.testing.assert_close(loss, loss2)
        try:
            K.token_logprobs(h @ w.T, y.view(-1), backend="triton")
        except RuntimeError as e:
            assert "triton is not installed" in str(e)
        else:
            raise AssertionError("backend='triton' without triton must raise")
        from rlvr_fast.kernels.flash_attention import flash_attention
        q, k = torch.randn(5, 4, 8, requires_grad=True), torch.randn(7, 2, 8)
        cq, ck = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
        out = flash_attention(q, k, k, cq, ck, 3, 4)
        out.sum().backward()
        torch.testing.assert_close(out, R.flash_attention_ref(q, k, k, cq, ck))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
