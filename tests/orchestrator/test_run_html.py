"""``RUN/run.html`` in a real headless Chromium (Debian's ``chromium``): the page renders and its figures are
not blank. Without PIL, the screenshot is decoded here (PNG: zlib and the five row filters)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from typer.testing import CliRunner

from moeplan.orchestrator.cli import app
from moeplan.simulator.report.run_html import CLASS_COLOURS
from tests.orchestrator.run_dirs import synthetic_run, tiny_plan  # noqa: F401 -- the session fixture

WIDTH, HEIGHT = 1400, 2600
PREDICTED_BAR = (0x9E, 0xCA, 0xE9)  # op_class_figure's predicted bars


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> np.ndarray:
    """PNG rows (each a filter byte, then the row) to ``[height, width * bpp]`` bytes."""
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(row.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (row + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: depend on the reconstructed left byte
            cur = row.tolist()
            up = prev.tolist()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) % 256
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) % 256
            row = np.array(cur, dtype=np.int32)
        out[y] = row
        prev = row
    return out


def read_png(path) -> np.ndarray:
    """``[height, width, channels]`` of an 8-bit RGB or RGBA, non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    return _unfilter(zlib.decompress(idat), width, height, bpp).reshape(height, width, bpp)[..., :3]


def _has(pixels: np.ndarray, rgb: tuple[int, int, int], at_least: int = 50) -> bool:
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= 6).sum()) >= at_least


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_the_png_reader_against_an_uncompressed_oracle(tmp_path) -> None:
    """Rows written with each filter by hand decode to the image."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    raw = b""
    prev = np.zeros(15, dtype=np.int32)
    for y, kind in enumerate((1, 2, 3, 4)):
        row = image[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(3, np.int32), row[:-3]])
        upleft = np.concatenate([np.zeros(3, np.int32), prev[:-3]])
        if kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        raw += bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes()
        prev = row
    assert (_unfilter(raw, 5, 4, 3).reshape(4, 5, 3) == image).all()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (apt-get install -y chromium)")
def test_run_html_renders_in_chromium(tmp_path, tiny_plan) -> None:  # noqa: F811
    run = synthetic_run(tmp_path / "run", tiny_plan, steps=3)
    assert CliRunner().invoke(app, ["check", str(run)], catch_exceptions=False).exit_code == 0
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
         (run / "run.html").as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = read_png(shot)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    assert pixels.std() > 10  # not a blank page
    comm = _hex(CLASS_COLOURS["communication"])
    left, right = pixels[:, : WIDTH // 2], pixels[:, WIDTH // 2:]
    assert _has(left, comm) and _has(right, comm)  # predicted and measured timelines, side by side
    assert _has(pixels, PREDICTED_BAR, 500)  # the op-class bars
    rows = (np.abs(pixels.astype(int) - comm).max(axis=-1) <= 6).any(axis=1)
    assert rows.sum() > 20 and pixels[rows].std() > 10  # timeline rows drawn, not one flat colour
