"""rlvr_fast.kernels needs torch alone: another trainer embeds the fused loss without our model,
tokenizer, checkpoint code or their dependencies.

The child process makes those modules unimportable (an import hook raises ModuleNotFoundError for
them, as if they were not installed), then imports the kernels and runs fused_linear_grpo_loss
forward and backward on CPU against the plain-PyTorch reference.
"""

import subprocess
import sys
import textwrap

BLOCKED = ("rlvr_fast.model", "rlvr_fast.checkpoint", "rlvr_fast.rollout", "rlvr_fast.grpo", "rlvr_fast.tasks",
           "rlvr_fast.tokenizer", "tokenizers", "jinja2", "safetensors", "numpy", "gguf")

CHILD = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"blocked by the test: {{name}}", name=name)
            return None

    sys.meta_path.insert(0, Block())

    import torch
    from rlvr_fast.kernels import fused_linear_grpo_loss
    from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref

    torch.manual_seed(0)
    B, T, H, V = 3, 5, 16, 40
    hidden = torch.randn(B, T, H, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    old, ref = -torch.rand(B, T, dtype=torch.float32) * 3, -torch.rand(B, T, dtype=torch.float32) * 3
    adv, mask = torch.randn(B, dtype=torch.float32), torch.ones(B, T)
    mask[1, 3:] = 0
    loss, stats = fused_linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask, beta=0.1)
    loss.backward()
    got = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    loss_ref, _ = fused_linear_grpo_loss_ref(hidden, weight, targets, old, ref, adv, mask, beta=0.1)
    loss_ref.backward()
    for a, b in zip(got, (loss_ref.detach(), hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    assert not leaked, leaked
    print("ok", float(loss), sorted(stats))
""")


def test_kernels_import_and_run_with_torch_alone(tmp_path):
    child = CHILD.format(blocked=BLOCKED)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout


def test_the_block_is_real(tmp_path):
    """The same child fails when the kernels need a blocked module (here: it imports one itself)."""
    child = CHILD.format(blocked=BLOCKED).replace("import torch\n", "import torch\nimport rlvr_fast.model\n", 1)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "blocked by the test: rlvr_fast.model" in proc.stderr
