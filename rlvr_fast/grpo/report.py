"""What the user sees: a progress line per step, metrics.jsonl, samples.jsonl, a PNG plot.

The plot is drawn here with no plotting library (zlib + the PNG format), to keep dependencies
at torch-and-friends: reward (blue) and accuracy (orange) against steps on a 0..1 grid, with the
held-out evaluation accuracy as green points.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any


class JsonlWriter:
    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.is_file():
            # On resume, drop records the killed run wrote after its last checkpoint.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(m: dict[str, Any], total_steps: int, eta_s: float) -> str:
    # None: every group had equal rewards, no update
    kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
    ent = "-" if m.get("entropy") is None else f"{m['entropy']:.2f}"
    groups = f"groups {m['groups_kept']}/{m['groups_drawn']}" if "groups_kept" in m else ""
    return (f"step {m['step']:>4}/{total_steps} | reward {m['reward_mean']:.3f} | acc {m['accuracy']:.3f} | "
            f"fmt {m['format_rate']:.2f} | len {m['completion_len_mean']:.0f} | {groups} | ent {ent} | kl {kl} | "
            f"{m['rollout_tokens_per_s']:.0f} tok/s | {m['step_time_s']:.1f}s/step | eta {format_duration(eta_s)}")


def write_plot(path: Path, metrics: list[dict[str, Any]], evals: list[dict[str, Any]],
               width: int = 640, height: int = 360) -> None:
    img = bytearray(b"\xff" * (width * height * 3))
    left, right, top, bottom = 40, width - 20, 20, height - 30

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            img[i:i + 3] = bytes(color)

    def line(x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            t = k / n
            put(round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t), color)

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid at reward/accuracy 0 .. 1
        y = bottom - frac * (bottom - top)
        line(left, y, right, y, (200, 200, 200) if frac else (0, 0, 0))
    line(left, top, left, bottom, (0, 0, 0))
    steps = [m["step"] for m in metrics] + [e["step"] for e in evals]
    if not steps:
        _save_png(path, img, width, height)
        return
    s_min, s_max = min(steps), max(max(steps), min(steps) + 1)
    sx = lambda s: left + (s - s_min) / (s_max - s_min) * (right - left)
    sy = lambda v: bottom - max(0.0, min(1.0, v)) * (bottom - top)
    for key, color in (("reward_mean", (31, 119, 180)), ("accuracy", (255, 127, 14))):
        pts = [(sx(m["step"]), sy(m[key])) for m in metrics if key in m]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            line(x0, y0, x1, y1, color)
    for e in evals:
        x, y = sx(e["step"]), sy(e["accuracy"])
        for dx in range(-3, 4):
            for dy in range(-3, 4):
                put(round(x) + dx, round(y) + dy, (44, 160, 44))
    _save_png(path, img, width, height)


def _save_png(path: Path, rgb: bytearray, width: int, height: int) -> None:
    raw = b"".join(b"\x00" + bytes(rgb[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
