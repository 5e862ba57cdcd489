"""One command for the day a GPU is lent: everything about the CUDA paths that a CPU cannot show.

    python bench/gpu_check.py                 # one NVIDIA GPU, at most ~8 minutes; report -> bench/gpu_check.md
    python bench/gpu_check.py --smoke         # the same code on the CPU with tiny shapes (tests/test_gpu_check.py)

It needs a source checkout and what a typical GPU image has (torch, triton, transformers, safetensors,
tokenizers, numpy, jinja2): no network, no model hub, no model files. Checkpoints are random weights with
real shapes, built here. Parts, in order, each in its own child process with its own time box, so a part
that fails or hangs still leaves the others' results in the report:

1. tests    the kernel, rollout and model test modules (they pick CUDA when it is there: every kernel against
            its reference in fp32/bf16/fp16), then our model's logits against transformers' on a random-weight
            Llama with Llama-3.2-1B widths.
2. kernels  each kernel at the Llama-3.1-8B shape: time, achieved GB/s or TFLOP/s and the share of the
            device's nominal peak, against the plain PyTorch path and, for the linear ops, the bare matmuls.
3. rollout  the engine vs transformers' generate on a Llama-3.2-1B shape (64 sequences x 256 new tokens,
            EOS ignored), CUDA graphs on and off; greedy output compared token by token in fp32.
4. step     one GRPO step on the 1B shape (after one warm-up step): time split and peak memory.
5. shared   shared-prompt training attention against plain varlen packing (bench/bench_shared_prompt.py):
            one layer at long completions, and one micro-step of the 1B shape with a long prompt.
6. qwen3    a random-weight Qwen3 with Qwen3-0.6B's shapes (tied, q/k norms, head_dim 128, vocabulary 151,936):
            logits against transformers' Qwen3ForCausalLM (2 layers, fp32), rollout tokens/s against
            generate and greedy identity as in 3 (bf16), and one GRPO step as in 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # rlvr_fast from this checkout, tests.tiny for the tokenizer

import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import shapes  # noqa: E402
from benchlib import (emit, lm_head_matmuls, markdown_table as table, run_child, run_pytest, time_fn,  # noqa: E402
                      versions)
from shapes import SHAPES, describe, shape as model_shape  # noqa: E402

from rlvr_fast.model.config import LlamaConfig  # noqa: E402

PARTS = {"tests": 180, "kernels": 80, "rollout": 120, "step": 100, "shared": 100,  # part -> time box (s) on a GPU
         "qwen3": 150}
SMOKE_TEST = "tests/test_kernels_api.py::test_public_api"
CUDA_TESTS = ["tests/test_kernels_token_logprobs.py", "tests/test_kernels_linear.py", "tests/test_kernels_grpo_loss.py",
              "tests/test_kernels_loss_variants.py", "tests/test_rollout_kernels.py", "tests/test_flash_attention.py",
              "tests/test_rollout.py", "tests/test_model.py", "tests/test_precision.py"]


# Nominal dense peaks (memory GB/s, bf16 tensor TFLOP/s) from the vendors' data sheets; first match of the name.
PEAKS = [("H200", 4800, 989), ("H100 PCIe", 2000, 756), ("H100", 3350, 989), ("B200", 8000, 2250),
         ("A100-SXM4-80GB", 2039, 312), ("A100", 1555, 312), ("L40S", 864, 362), ("A10G", 600, 125), ("L4", 300, 121),
         ("RTX 4090", 1008, 165)]


def device_peaks(name: str) -> tuple[float | None, float | None]:
    for key, gbs, tflops in PEAKS:
        if key in name:
            return gbs, tflops
    return None, None


# ----------------------------------------------------------------------------------------------- helpers

def random_model(shape: LlamaConfig, device: torch.device, dtype: torch.dtype):
    """bench/shapes.py's random-weight model; Llama shapes with an untied head (the 8B's layout at 1B widths),
    Qwen3's tied as the 0.6B is."""
    tied = shape.tie_word_embeddings and shape.model_type != "llama"
    return shapes.random_model(dataclasses.replace(shape, tie_word_embeddings=tied), device, dtype)


def save_random_checkpoint(model, path: Path) -> Path:
    """HF layout with the small test tokenizer (its vocabulary is smaller than the model's: ids past it decode to '')."""
    from rlvr_fast import Tokenizer, save_pretrained
    from tests.tiny import write_tokenizer_files
    tok_dir = path.with_name(path.name + ".tok")
    write_tokenizer_files(tok_dir)
    save_pretrained(model, Tokenizer.from_dir(tok_dir), path)
    return path


# ----------------------------------------------------------------------------------------------- parts

def part_tests(args, device: torch.device) -> str:
    tests = [SMOKE_TEST] if args.smoke else [t for t in CUDA_TESTS if (ROOT / t).exists()]
    budget = 60 if args.smoke else PARTS["tests"] - 60
    rc, failed, summary = run_pytest(tests, timeout=budget)
    verdict = f"timed out after {budget} s" if rc is None else f"exit {rc}"
    report = [f"`{' '.join(['python -m pytest -q'] + tests)}`: {verdict}", "", "```", *failed[:30], summary, "```", ""]
    report.append(model_parity(args, device))
    return "\n".join(report)


def model_parity(args, device: torch.device, name: str = "llama-3.2-1b") -> str:
    """Our logits vs transformers' model of the same family, same random weights (2 layers at `name`'s widths)."""
    import transformers
    shape = model_shape(smoke_shape(args, name), num_hidden_layers=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_checkpoint(random_model(shape, torch.device("cpu"), torch.float32), Path(tmp) / "model")
        ids = torch.randint(0, shape.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
        from rlvr_fast.checkpoint import load_model
        for dtype, tol in [(torch.float32, 2e-3), (torch.bfloat16, None)]:
            torch.backends.cuda.matmul.allow_tf32 = False
            ours = load_model(path, device=device, dtype=dtype)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            with torch.no_grad():
                a, b = ours(ids).float(), hf(ids).logits.float()
            diff, scale = (a - b).abs().max().item(), b.abs().max().item()
            ok = "yes" if tol is None or diff <= tol * max(scale, 1.0) else f"NO (tolerance {tol} x max |logit|)"
            rows.append([str(dtype).removeprefix("torch."), f"{diff:.3g}", f"{scale:.3g}",
                         ok if tol else "(report only: bf16 kernels differ)"])
            del ours, hf
    return "Model logits vs transformers (random weights, " + f"{describe(shape)}):\n\n" + table(
        ["dtype", "max abs diff", "max abs logit", "within tolerance"], rows)


def part_kernels(args, device: torch.device) -> str:
    from rlvr_fast.kernels import fused_linear_grpo_loss, grpo_loss, linear_token_logprobs, token_logprobs
    from rlvr_fast.kernels.paged_attention import paged_attention
    from rlvr_fast.kernels.paged_reference import paged_attention_ref, sample_ref
    from rlvr_fast.kernels.sampling import sample
    s = SHAPES["tiny" if args.smoke else "llama-3.1-8b"]
    n = 64 if args.smoke else 8192                      # tokens in one loss/log-prob call
    dt = torch.float32 if args.smoke else torch.bfloat16
    dname = str(dt).removeprefix("torch.")
    reps = 2 if args.smoke else 5
    peak_gbs, peak_tf = device_peaks(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    g = torch.Generator(device=device).manual_seed(0)
    rows = []

    def add(op: str, what: str, ours, peer, peer_name: str, amount: float, unit: str):
        try:
            t_ours = time_fn(ours, device, reps=reps)
            t_peer = time_fn(peer, device, reps=reps) if peer else None
        except Exception as exc:  # report and go on with the next op
            rows.append([op, what, f"error: {type(exc).__name__}: {str(exc)[:120]}", "", "", "", ""])
            return
        rate = amount / t_ours / (1e9 if unit == "GB/s" else 1e12)
        peak = peak_gbs if unit == "GB/s" else peak_tf
        rows.append([op, what, f"{t_ours * 1e3:.2f}", f"{rate:.1f} {unit}",
                     f"{100 * rate / peak:.0f}%" if peak else "n/a",
                     f"{peer_name} {t_peer * 1e3:.2f}" if t_peer else "", f"{t_peer / t_ours:.2f}x" if t_peer else ""])

    def fwd_bwd(fn, *leaves):
        def run():
            for x in leaves:
                x.grad = None
            out = fn()
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        return run

    v, h = s.vocab_size, s.hidden_size
    logits = torch.randn(n, v, device=device, generator=g).to(dt).requires_grad_()
    tgt = torch.randint(0, v, (n,), device=device, generator=g)
    naive_lp = lambda: torch.log_softmax(logits.float(), -1).gather(-1, tgt[:, None])
    add("token_logprobs", f"[{n}, {v}] {dname} fwd+bwd", fwd_bwd(lambda: token_logprobs(logits, tgt), logits),
        fwd_bwd(naive_lp, logits), "log_softmax+gather", 3 * logits.numel() * logits.element_size(), "GB/s")
    del logits

    hid = (torch.randn(n, h, device=device, generator=g) * 0.1).to(dt).requires_grad_()
    w = (torch.randn(v, h, device=device, generator=g) * 0.02).to(dt).requires_grad_()
    matmuls = lm_head_matmuls(hid, w)  # the bare work of any lm-head loss: logits, then d hidden and d weight
    add("linear_token_logprobs", f"N {n}, H {h}, V {v} {dname} fwd+bwd",
        fwd_bwd(lambda: linear_token_logprobs(hid, w, tgt), hid, w), matmuls, "3 bare matmuls", 8 * n * h * v, "TFLOP/s")
    b, t = 16, n // 16
    adv = torch.randn(b, device=device, generator=g)
    mask = torch.ones(b, t, device=device)
    old = torch.randn(b, t, device=device, generator=g).clamp(max=0) - 5
    add("fused_linear_grpo_loss", f"N {n}, H {h}, V {v} {dname} fwd+bwd",
        fwd_bwd(lambda: fused_linear_grpo_loss(hid.view(b, t, h), w, tgt.view(b, t), old, old, adv, mask), hid, w),
        matmuls, "3 bare matmuls", 6 * n * h * v, "TFLOP/s")
    del hid, w, matmuls

    lp = (torch.randn(64, 4096 if not args.smoke else 32, device=device, generator=g) - 5).requires_grad_()
    old2, m2, a2 = lp.detach() - 0.01, torch.ones_like(lp), torch.randn(64, device=device, generator=g)
    add("grpo_loss", f"[{lp.shape[0]}, {lp.shape[1]}] fp32 fwd+bwd",
        fwd_bwd(lambda: grpo_loss(lp, old2, old2, a2, m2), lp),
        fwd_bwd(lambda: grpo_loss(lp, old2, old2, a2, m2, backend="torch"), lp), "torch path",
        5 * lp.numel() * 4, "GB/s")

    batch, ctx, block = 64, (64 if args.smoke else 2048), 16
    nblk = batch * ctx // block
    kc = torch.randn(nblk, block, s.num_key_value_heads, s.head_dim, device=device, generator=g).to(dt)
    vc = torch.randn_like(kc)
    q = torch.randn(batch, s.num_attention_heads, s.head_dim, device=device, generator=g).to(dt)
    bt = torch.randperm(nblk, device=device).view(batch, -1).int()
    lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    add("paged_attention", f"decode {batch} seqs x {ctx} ctx, {s.num_attention_heads}/{s.num_key_value_heads} heads "
        f"d {s.head_dim} {dname}", lambda: paged_attention(q, kc, vc, bt, lens),
        lambda: paged_attention_ref(q, kc, vc, bt, lens, s.head_dim ** -0.5), "torch reference",
        2 * kc.numel() * kc.element_size(), "GB/s")
    del kc, vc

    z = torch.randn(batch, v, device=device, generator=g)
    keys = torch.arange(batch, device=device)
    add("sample", f"[{batch}, {v}] fp32, T=1", lambda: sample(z, keys, 1.0), lambda: sample_ref(z, keys, 1.0),
        "torch reference", z.numel() * 4, "GB/s")

    try:
        from rlvr_fast.kernels.flash_attention import flash_attention
    except ImportError:
        flash_attention = None
    if flash_attention is not None:
        seqs, length = (2, 64) if args.smoke else (4, 4096)
        hq, hkv, d = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        qf = torch.randn(seqs * length, hq, d, device=device, generator=g).to(dt).requires_grad_()
        kf = torch.randn(seqs * length, hkv, d, device=device, generator=g).to(dt).requires_grad_()
        vf = torch.randn_like(kf).requires_grad_()
        cu = torch.arange(0, (seqs + 1) * length, length, device=device, dtype=torch.int32)

        def sdpa():
            qq, kk, vv = (x.view(seqs, length, -1, d).transpose(1, 2) for x in (qf, kf, vf))
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        flops = 3.5 * 4 * seqs * length * length * hq * d / 2  # causal: half the pairs; bwd = 2.5x fwd
        add("flash_attention", f"{seqs} x {length} causal, {hq}/{hkv} heads d {d} {dname} fwd+bwd",
            fwd_bwd(lambda: flash_attention(qf, kf, vf, cu, cu, length, length), qf, kf, vf),
            fwd_bwd(sdpa, qf, kf, vf), "SDPA", flops, "TFLOP/s")
    else:
        rows.append(["flash_attention", "not in this checkout", "", "", "", "", ""])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    head = (f"Device {name}: nominal peaks {peak_gbs or 'n/a'} GB/s, {peak_tf or 'n/a'} bf16 TFLOP/s. "
            "Medians of {reps} calls after a warm-up; 'vs' = peer time / ours.\n\n").replace("{reps}", str(reps))
    return head + table(["op", "shape", "ours (ms)", "achieved", "of peak", "peer (ms)", "vs"], rows)


def smoke_shape(args, name: str) -> str:
    """`name`, or its tiny stand-in of the same family under --smoke."""
    return name if not args.smoke else "qwen3-tiny" if name.startswith("qwen3") else "tiny"


def part_rollout(args, device: torch.device, name: str = "llama-3.2-1b", sizes: tuple = (8, 8, 256)) -> str:
    import transformers
    from bench_rollout import hf_generate
    from rlvr_fast import RolloutEngine, SamplingParams
    shape = SHAPES[smoke_shape(args, name)]
    prompts, n, new = (2, 2, 8) if args.smoke else sizes
    dt = torch.float32 if args.smoke else torch.bfloat16
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(shape, device, dt)
        path = save_random_checkpoint(model, Path(tmp) / "model")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, shape.vocab_size, (prompts, 128 if not args.smoke else 16), generator=g)
        want = prompts * n * new

        def engine_run(graphs: bool):
            engine = RolloutEngine(model, use_cuda_graphs=graphs)
            params = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
            return lambda: sum(len(c.token_ids) for group in engine.generate(ids.tolist(), params, n=n) for c in group)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(device).eval()
        hf_run = lambda: hf_generate(hf, ids.tolist(), n, new, 1.0, pad=0)  # noqa: E731
        variants = [("engine, CUDA graphs", engine_run(True)), ("engine, no graphs", engine_run(False)),
                    ("transformers generate", hf_run)]
        if device.type != "cuda":
            variants.pop(0)  # graphs are CUDA-only
        secs = {}
        for name, fn in variants:
            got = fn()  # warm-up (and graph capture)
            if got != want:
                raise RuntimeError(f"{name} generated {got} tokens, expected {want}")
            secs[name] = time_fn(fn, device, warmup=0, reps=2)
        base = secs["transformers generate"]
        rows = [[name, f"{want / t:.0f}", f"{base / t:.2f}x"] for name, t in secs.items()]
        del hf, model

        # Greedy identity in fp32 (TF32 off): the same argmax at every step, or where the first difference is.
        torch.backends.cuda.matmul.allow_tf32 = False
        ours = random_model(shape, device, torch.float32)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        k = 32 if not args.smoke else 8
        got = [c[0].token_ids for c in RolloutEngine(ours).generate(
            ids.tolist(), SamplingParams(temperature=0.0, max_new_tokens=k, ignore_eos=True))]
        with torch.inference_mode():
            ref = hf.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                              max_new_tokens=k, min_new_tokens=k, pad_token_id=0)[:, ids.shape[1]:].tolist()
        same = sum(a == b for a, b in zip(got, ref))
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), k) for a, b in zip(got, ref)]
        lines.append(f"Greedy, fp32, {prompts} prompts x {k} tokens: {same}/{prompts} sequences identical to "
                     f"transformers; first differing position per sequence: {prefix} ({k} = none).")
    head = (f"{describe(shape)} random weights, {prompts} prompts x {n} completions x {new} new tokens, EOS ignored, "
            f"{str(dt).removeprefix('torch.')}, median of 2 after a warm-up.\n\n")
    return head + table(["generator", "tokens/s", "vs transformers"], rows) + "\n\n" + "\n".join(lines)


class ParityTask:
    """Multiply prompts with a reward that splits every group (the crc of the completion's text, odd or even):
    a random-weight model then still gives the update work to time."""

    name = "gpu-check"
    reward_weights = {"correct": 1.0}

    def __init__(self, cfg):
        from rlvr_fast.tasks import make_task
        self.inner = make_task(cfg)

    def sample(self, rng, n):
        return self.inner.sample(rng, n)

    def eval_problems(self):
        return self.inner.eval_problems()[:2]

    def score(self, problem, completion):
        return {"correct": float(zlib.crc32(completion.encode()) % 2)}


def part_step(args, device: torch.device, name: str = "llama-3.2-1b", sizes: tuple = (8, 8, 256)) -> str:
    from rlvr_fast.grpo.config import TrainConfig
    from rlvr_fast.grpo.trainer import GRPOTrainer
    from rlvr_fast.tokenizer import Tokenizer
    shape = SHAPES[smoke_shape(args, name)]
    p, gsize, new = (2, 2, 8) if args.smoke else sizes
    dt = torch.float32 if args.smoke else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_checkpoint(random_model(shape, torch.device("cpu"), torch.float32), Path(tmp) / "model")
        from rlvr_fast.checkpoint import load_model
        model, tok = load_model(path, device=device, dtype=dt), Tokenizer.from_dir(path)
        cfg = TrainConfig(task="multiply", model=str(path), steps=2, prompts_per_step=p, group_size=gsize,
                          max_new_tokens=new, device=device.type, dtype=str(dt).removeprefix("torch."),
                          eval_size=2, output=str(Path(tmp) / "run"))
        (Path(tmp) / "run").mkdir()
        trainer = GRPOTrainer(cfg, model, tok, ParityTask(cfg), Path(tmp) / "run", device)
        trainer.train_step()  # warm-up: kernels compile, CUDA graphs are captured
        m = trainer.train_step()
    keys = ["time_rollout_s", "time_reference_s", "time_update_s", "time_optimizer_s", "step_time_s", "peak_memory_gb",
            "rollout_tokens_per_s", "train_tokens_per_s"]
    rows = [[k, f"{m[k]:.3f}" if isinstance(m.get(k), float) else m.get(k, "missing")] for k in keys]
    head = (f"{describe(shape)} random weights, {str(dt).removeprefix('torch.')}, {p} prompts x {gsize} completions x up to "
            f"{new} tokens, beta {cfg.beta}; the second of two steps. time_update_s is forward + backward + optimizer; time_optimizer_s is the "
            "optimizer's part (gradient reduction, clipping, AdamW, the copy back to the model).\n\n")
    return head + table(["metric", "value"], rows)


def part_shared(args, device: torch.device) -> str:
    """bench_shared_prompt.py's own tables (its children, its method), at sizes that fit the part's time box."""
    if args.smoke:
        sizes = ["--what", "layer,step", "--sizes", "4x2x8", "--step-sizes", "4x2x8", "--layers", "1", "--reps", "1"]
    else:
        sizes = ["--what", "layer,step", "--sizes", "1024x16x2048,128x16x8192", "--step-sizes", "1024x8x1024",
                 "--reps", "3"]
    cmd = [sys.executable, str(ROOT / "bench" / "bench_shared_prompt.py"), *sizes, "--variants", "plain,shared,flex",
           "--no-mem", "--no-write"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # the bench's own error, not just an exit status, goes into the report
        raise RuntimeError(f"bench_shared_prompt.py failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    tables = out.stdout[out.stdout.index("One attention op"):] if "One attention op" in out.stdout else out.stdout
    return f"`{' '.join(cmd[1:]).replace(str(ROOT) + '/', '')}`\n\n{tables.strip()}"


def part_qwen3(args, device: torch.device) -> str:
    """Parts 1's logits, 3 and 4 on Qwen3-0.6B's shapes, smaller batches so that the three fit one time box."""
    return "\n\n".join([model_parity(args, device, "qwen3-0.6b"),
                         "Rollout: " + part_rollout(args, device, "qwen3-0.6b", (8, 8, 128)),
                         "GRPO step: " + part_step(args, device, "qwen3-0.6b", (8, 4, 128))])


PART_FNS = {"tests": part_tests, "kernels": part_kernels, "rollout": part_rollout, "step": part_step,
            "shared": part_shared, "qwen3": part_qwen3}


# ----------------------------------------------------------------------------------------------- driver

def run_part(name: str, args) -> tuple[str, str, float]:
    """Run one part in a child process under its time box; (status, markdown, seconds)."""
    cmd = [sys.executable, __file__, "--part", name] + (["--smoke"] if args.smoke else [])
    res = run_child(cmd, timeout=120 if args.smoke else PARTS[name], label=f"gpu_check {name}")
    if "error" in res:  # its traceback, or what it printed before the time box closed
        return res["failed"], f"```\n{res['log']}\n```", res["wall_s"]
    return "ok", res["body"], res["wall_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks this script, measures nothing")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu_check.md")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)     # child: run one part
    args = ap.parse_args()

    if args.part:  # child process
        if not args.smoke and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device (use --smoke to check the script on the CPU)")
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        emit({"body": PART_FNS[args.part](args, device)})  # a failure's traceback goes to stderr, into the report
        return 0

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine, or --smoke to check it on the CPU")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU (--smoke)"
    report = [f"# GPU check: {name}", "",
              f"`python bench/gpu_check.py{' --smoke' if args.smoke else ''}`, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{versions('transformers', 'flash-attn')}.", ""]
    summary = []
    for part in args.parts:
        status, body, secs = run_part(part, args)
        summary.append([part, status, f"{secs:.0f}"])
        report += [f"## {part}: {status} ({secs:.0f} s)", "", body, ""]
        print(f"gpu_check: {part}: {status} ({secs:.0f} s)", flush=True)
    report[4:4] = [table(["part", "status", "seconds"], summary), ""]
    text = "\n".join(report)
    args.out.write_text(text)
    print(text)
    print(f"\ngpu_check: report written to {args.out}")
    return 0 if all(row[1] == "ok" for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
