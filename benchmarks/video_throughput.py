"""Decode + preprocess throughput for 32-frame clips at max_pixels 200704 (not a timed test).

Generates an mp4 (OpenCV 'mp4v') and a zip of JPEG frames with the same content, then times
`load_video` (release sampling, 32 frames) + `preprocess_video` per clip:
  * in this process (decode and preprocess timed separately), and
  * through Grain worker processes (`MapDataset.source(...).map(...).to_iter_dataset()
    .mp_prefetch(MultiprocessingOptions(num_workers=N))`), steady state after the first clip.
Prints a Markdown table (clips/s and clips/s per core used).

  python benchmarks/video_throughput.py [--clips 16] [--workers 0,1,2] [--size 640x480]
"""
from __future__ import annotations

import argparse
import os
import sys

# One compute thread per process, so that "per core" means one core (set before numpy loads).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
import tempfile
import time
import zipfile

import cv2
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deepintuit_jax.data.video import load_video, preprocess_video  # noqa: E402

cv2.setNumThreads(1)

MAX_PIXELS = 200704
MIN_PIXELS = 56 * 56


def make_frames(n: int, w: int, h: int) -> list[np.ndarray]:
  """Moving textured content (BGR) so that codecs and resizing do real work."""
  rng = np.random.default_rng(0)
  base = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
  out = []
  for i in range(n):
    f = np.roll(base, shift=(i * 3, i * 5), axis=(0, 1)).copy()
    cv2.circle(f, ((i * 7) % w, h // 2), h // 6, (255 - i % 256, i % 256, 128), -1)
    out.append(f)
  return out


def write_sources(tmp: str, n: int, w: int, h: int, fps: float = 30.0) -> tuple[str, str]:
  frames = make_frames(n, w, h)
  mp4 = os.path.join(tmp, "clip.mp4")
  wr = cv2.VideoWriter(mp4, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
  for f in frames:
    wr.write(f)
  wr.release()
  zpath = os.path.join(tmp, "clip.zip")
  with zipfile.ZipFile(zpath, "w", zipfile.ZIP_STORED) as zf:
    for i, f in enumerate(frames):
      zf.writestr(f"frame_{i + 1}.jpg", cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1])
  return mp4, zpath


class DecodeAndPreprocess:
  """Grain map: path -> (pixel_values_videos, video_grid_thw). Picklable for worker processes."""

  def __call__(self, path: str):
    clip = load_video(path, sampling="release", max_frames=32)
    return preprocess_video(clip.frames, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def bench_inline(path: str, clips: int) -> dict:
  """Wall and CPU seconds per clip in this process (CPU time is robust to a shared machine)."""
  t_dec = t_pre = c_dec = c_pre = 0.0
  for _ in range(clips):
    t0, c0 = time.perf_counter(), time.process_time()
    clip = load_video(path, sampling="release", max_frames=32)
    t1, c1 = time.perf_counter(), time.process_time()
    pv, grid = preprocess_video(clip.frames, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    t2, c2 = time.perf_counter(), time.process_time()
    t_dec, t_pre, c_dec, c_pre = t_dec + t1 - t0, t_pre + t2 - t1, c_dec + c1 - c0, c_pre + c2 - c1
  return {"decode_s": t_dec / clips, "preprocess_s": t_pre / clips,
          "decode_cpu_s": c_dec / clips, "preprocess_cpu_s": c_pre / clips,
          "clips_per_s": clips / (t_dec + t_pre), "clips_per_cpu_s": clips / (c_dec + c_pre),
          "grid": [int(g) for g in grid], "tokens": int(np.prod(grid)) // 4,
          "frames": clip.frames.shape}


def bench_grain(path: str, clips: int, workers: int) -> tuple[float, float]:
  """Clips per second through Grain: (steady state after the first clip, including start-up)."""
  import grain  # noqa: PLC0415
  ds = grain.MapDataset.source([path] * (clips + 1)).map(DecodeAndPreprocess())
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=1))
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  t1 = time.perf_counter()
  n = sum(1 for _ in it)
  assert n == clips, n
  t2 = time.perf_counter()
  return clips / (t2 - t1), (clips + 1) / (t2 - t0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--clips", type=int, default=16)
  ap.add_argument("--workers", default="0,1,2", help="comma-separated grain worker counts")
  ap.add_argument("--size", default="640x480", help="source WxH")
  ap.add_argument("--source-frames", type=int, default=300)
  args = ap.parse_args()
  from absl import flags  # noqa: PLC0415  (grain reads absl flags in its workers)
  flags.FLAGS.mark_as_parsed()
  w, h = (int(v) for v in args.size.split("x"))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"machine: {cores} cores available ({os.cpu_count()} total), cv2 {cv2.__version__}, "
        f"cv2 threads {cv2.getNumThreads()}; source {w}x{h}, {args.source_frames} frames @30fps")
  with tempfile.TemporaryDirectory() as tmp:
    mp4, zpath = write_sources(tmp, args.source_frames, w, h)
    rows = []
    for name, path in (("mp4", mp4), ("zip of JPEGs", zpath)):
      r = bench_inline(path, args.clips)
      print(f"{name}: {r['frames']} -> grid {r['grid']} ({r['tokens']} merged tokens); per clip "
            f"decode {r['decode_s'] * 1e3:.0f} ms wall / {r['decode_cpu_s'] * 1e3:.0f} ms CPU, "
            f"preprocess {r['preprocess_s'] * 1e3:.0f} ms wall / "
            f"{r['preprocess_cpu_s'] * 1e3:.0f} ms CPU")
      rows.append((name, "in-process (wall)", 1, r["clips_per_s"]))
      rows.append((name, "in-process (CPU time)", 1, r["clips_per_cpu_s"]))
      for n in (int(v) for v in args.workers.split(",")):
        steady, total = bench_grain(path, args.clips, n)
        mode = f"grain, {n} workers" if n else "grain, in-process"
        rows.append((name, mode, max(n, 1), steady, total))
    mb = r["tokens"] * 4 * 1176 * 4 / 2**20
    print(f"pixel_values_videos per clip: {mb:.0f} MiB float32")
    print("\n| source | mode | cores used | clips/s | clips/s per core | incl. start-up |")
    print("|---|---|---|---|---|---|")
    for name, mode, used, cps, *total in rows:
      used = min(used, cores)
      tot = f"{total[0]:.2f}" if total else "-"
      print(f"| {name} | {mode} | {used} | {cps:.2f} | {cps / used:.2f} | {tot} |")


if __name__ == "__main__":
  main()
