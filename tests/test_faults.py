"""Faults end cleanly: a rank killed mid-step (torchrun, 2 CPU ranks, gloo), and the reward and loss faults a
run survives (raising, hanging, NaN rewards; NaN loss). Each fault, what happens and its test are listed in
the README's "Checkpoints and resume" section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlvr_fast.tasks import Problem, register_task
from rlvr_fast.train import main
from tests import dist_launch  # noqa: F401  (registers kill-a-rank here too, for the one-process run)
from tests.test_distributed import COMMON, assert_same_metrics, free_port, metrics
from tests.test_train import DigitsTask, args
from tests.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
HARD_TIMEOUT_S = 240  # a torchrun that outlives this is killed with all its ranks, and the test fails


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def torchrun(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """2 ranks on the CPU, in a process group of their own, so that a hang past HARD_TIMEOUT_S kills every rank
    rather than leaving them behind. (exit code, stderr, wall-clock time of its end)"""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--tee", "3", "-m", "tests.dist_launch", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=HARD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not end within {HARD_TIMEOUT_S} s: a rank hangs")
    return proc.returncode, err, time.time()


def test_a_killed_rank_stops_the_run_with_its_name_and_resume_continues_exactly(tiny, tmp_path):
    """Rank 1 is SIGKILLed while scoring step 2's completions. Rank 0 must end well within --dist-timeout (30 s),
    saying that rank 1 was lost; resuming on 2 ranks from checkpoint-1 then gives the metrics of an
    uninterrupted run."""
    straight = tmp_path / "straight"
    task = ("--task", "kill-a-rank", *COMMON[2:], "--save-every", "1")
    assert main(args(tiny, straight, *task, "--steps", "3")) == 0

    out, died = tmp_path / "run", tmp_path / "died"
    code, err, end = torchrun(args(tiny, out, *task, "--steps", "3", "--dist-timeout", "30"),
                              env={"RLVR_TEST_KILL_RANK": "1", "RLVR_TEST_KILL_FILE": str(died)})
    assert code != 0 and died.exists(), err[-3000:]
    assert end - float(died.read_text()) < 30, err[-3000:]
    assert ("[default0]:error: rank 0 at step 2: " in err and "lost: rank 1 (did not answer within 3 s: killed, "
            "crashed or hung)" in err), err[-3000:]
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    assert [m["step"] for m in metrics(out)] == [1]

    code, err, _ = torchrun(["--resume", str(out), "--dist-timeout", "30"])
    assert code == 0, err[-3000:]
    assert_same_metrics(metrics(out), metrics(straight))


class PartlyNaNTask(DigitsTask):
    """Rewards NaN for one completion in four: today such a step's update is skipped and counted, like a NaN loss."""

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        scores = super().score(problem, completion)
        return {**scores, "hash": float("nan")} if self.calls % 4 == 0 else scores


register_task("partly-nan-test", lambda cfg: PartlyNaNTask())


def test_nan_rewards_for_some_completions_skip_the_update_and_count(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "partly-nan-test", "--steps", "3", "--max-bad-steps", "2")) == 1
    assert "2 consecutive updates had NaN/Inf loss or gradients" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in records] == [True, True]
