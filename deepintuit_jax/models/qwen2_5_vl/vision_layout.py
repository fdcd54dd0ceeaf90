"""Host-side (NumPy) layout of the Qwen2.5-VL vision tower's data-dependent indexing.

Everything that depends on the image / video grids is computed here, once per batch, so
the jitted tower only sees arrays (and recompiles only when padded shapes change):

* rotary position ids `(h, w)` of every patch (merge-block-major, as HF);
* the window permutation (HF's `get_window_index`) of the patches and the inverse
  permutation of the merged tokens;
* for each attention kind a *block layout*: attention runs on `[S, L, heads, head_dim]`
  blocks gathered from the (permuted) token sequence. Each attention segment (one window
  for windowed attention, one frame for full attention) is a contiguous run of the
  permuted sequence; segments are packed in order into rows of length `L` (next-fit), and
  a per-entry segment id makes attention block-diagonal inside a row. Memory is
  O(S * L^2), never O(N^2).

Token order convention: "permuted" = the window order in which the tower's blocks run;
"original" = the order of `pixel_values` (and of HF's outputs).
"""
from __future__ import annotations

import math

import flax.struct
import numpy as np

from deepintuit_jax.models.qwen2_5_vl.config import VisionConfig


@flax.struct.dataclass
class BlockLayout:
  """Packing of attention segments into `[S, L]` blocks (all NumPy int32 / bool).

  gather:  [S, L] int32  permuted-token index of each block entry (0 where not valid).
  valid:   [S, L] bool   entry holds a real token.
  segment: [S, L] int32  segment id of the entry (-1 where not valid); entries attend to
                         entries of the same row with the same id (invalid entries only to
                         each other, so every query row has a key and stays finite).
  scatter: [N] int32     flat index into the `S * L` entries of each permuted token; padding
                         tokens point past the end (`S * L`) and receive zeros.
  """
  gather: np.ndarray
  valid: np.ndarray
  segment: np.ndarray
  scatter: np.ndarray


@flax.struct.dataclass
class VisionLayout:
  """Everything the vision tower needs about the grids of one call (a pytree of arrays).

  rotary_pos:    [N, 2] int32  (h, w) rotary position of each patch, in permuted order.
  window_perm:   [N] int32     original patch index of each permuted slot
                               (`x_perm = x[window_perm]`); padding maps to itself.
  merge_inverse: [M] int32     permuted merged-token index of each original merged token
                               (`out = merged_perm[merge_inverse]`), M = N / merge**2.
  merged_valid:  [M] bool      merged token is real (False for `pad_to` padding, at the end).
  windowed:      BlockLayout   for blocks not in `fullatt_block_indexes`.
  full:          BlockLayout   for the others (attention within each frame).
  """
  rotary_pos: np.ndarray
  window_perm: np.ndarray
  merge_inverse: np.ndarray
  merged_valid: np.ndarray
  windowed: BlockLayout
  full: BlockLayout

  @property
  def num_patches(self) -> int:
    """N, padding included."""
    return int(self.window_perm.shape[0])

  @property
  def num_merged_tokens(self) -> int:
    """Number of real merged tokens (output rows that are not padding); host arrays only."""
    return int(np.asarray(self.merged_valid).sum())


def _check_grid(grid_thw, merge: int) -> np.ndarray:
  grid = np.asarray(grid_thw)
  if grid.size == 0:
    return np.zeros((0, 3), np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"grid_thw must have shape [n, 3] (t, h, w), got {grid.shape}")
  if not np.issubdtype(grid.dtype, np.integer):
    if not np.all(grid == np.round(grid)):
      raise ValueError(f"grid_thw must be integers, got {grid.tolist()}")
  grid = grid.astype(np.int64)
  if np.any(grid <= 0):
    raise ValueError(f"grid_thw entries must be positive, got {grid.tolist()}")
  bad = [i for i, (_, h, w) in enumerate(grid) if h % merge or w % merge]
  if bad:
    raise ValueError(f"grid_thw rows {bad} ({grid[bad].tolist()}): h and w must be multiples of "
                     f"spatial_merge_size={merge}")
  return grid


def rotary_positions(grid: np.ndarray, merge: int) -> np.ndarray:
  """(h, w) patch positions in the original order, merge-block-major as HF: [N, 2] int32."""
  out = []
  for t, h, w in grid:
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: the m x m patches of a merged token are adjacent.
    blocks = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()
    hw = np.stack([blocks(hh), blocks(ww)], axis=-1)
    out.append(np.tile(hw, (t, 1)))
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def window_index(grid: np.ndarray, config: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """HF's `get_window_index`: merged-token permutation and the window lengths.

  Returns:
    index:   [M] int64, original merged-token index of each slot in window order.
    lengths: [n_windows] int64, patches per non-empty window (HF's cu_window_seqlens diffs).
  """
  m = config.spatial_merge_size
  vmw = config.window_size // m // config.patch_size  # window side in merged tokens
  index, lengths, offset = [], [], 0
  for t, h, w in grid:
    lh, lw = h // m, w // m
    nh, nw = -(-lh // vmw), -(-lw // vmw)
    padded = np.full((t, nh * vmw, nw * vmw), -1, np.int64)
    padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    # [t, nh, vmw, nw, vmw] -> [t, nh, nw, vmw, vmw]: windows in row-major order per frame.
    wins = padded.reshape(t, nh, vmw, nw, vmw).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    counts = (wins >= 0).sum(-1)
    flat = wins.ravel()
    index.append(flat[flat >= 0] + offset)
    lengths.append(counts[counts > 0] * m * m)  # HF drops empty windows (unique_consecutive)
    offset += t * lh * lw
  if not index:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return np.concatenate(index), np.concatenate(lengths)


def pack_segments(lengths: np.ndarray, num_tokens: int, row_len: int,
                  num_rows: int | None = None, *, kind: str = "") -> BlockLayout:
  """Packs consecutive segments of the permuted sequence into rows of `row_len` (next-fit).

  Args:
    lengths: [n_seg] tokens per segment; segments cover tokens 0..sum(lengths)-1 in order.
    num_tokens: N, the total token count (>= sum(lengths); the rest is padding).
    row_len: L; every segment must fit in a row.
    num_rows: S; None = as many as needed. With a fixed S, S >= 2 * ceil(sum / L) always
      suffices (next-fit fills any two consecutive rows with more than L tokens).
  """
  lengths = np.asarray(lengths, np.int64)
  n_real = int(lengths.sum())
  if n_real > num_tokens:
    raise ValueError(f"{kind} layout: segments hold {n_real} tokens, more than {num_tokens}")
  if lengths.size and lengths.max() > row_len:
    raise ValueError(f"{kind} layout: a segment of {int(lengths.max())} tokens does not fit in "
                     f"rows of {row_len} (raise the row length, e.g. max_frame_patches)")
  # Next-fit is inherently sequential; the loop is over segments (windows/frames), not tokens.
  row = np.zeros(lengths.shape, np.int64)
  col = np.zeros(lengths.shape, np.int64)
  r, fill = 0, 0
  for i, n in enumerate(lengths.tolist()):
    if fill + n > row_len:
      r, fill = r + 1, 0
    row[i], col[i] = r, fill
    fill += n
  needed = r + 1 if lengths.size else 0
  rows = max(needed, 1) if num_rows is None else num_rows
  if needed > rows:
    raise ValueError(f"{kind} layout: needs {needed} rows of {row_len}, only {rows} allowed")
  seg_of_tok = np.repeat(np.arange(lengths.size), lengths)
  start = np.cumsum(lengths) - lengths
  within = np.arange(n_real) - start[seg_of_tok]
  flat = row[seg_of_tok] * row_len + col[seg_of_tok] + within
  gather = np.zeros(rows * row_len, np.int32)
  valid = np.zeros(rows * row_len, bool)
  segment = np.full(rows * row_len, -1, np.int32)
  gather[flat] = np.arange(n_real)
  valid[flat] = True
  segment[flat] = seg_of_tok
  scatter = np.full(num_tokens, rows * row_len, np.int32)
  scatter[:n_real] = flat
  shape = (rows, row_len)
  return BlockLayout(gather=gather.reshape(shape), valid=valid.reshape(shape),
                     segment=segment.reshape(shape), scatter=scatter)


def vision_layout(grid_thw: np.ndarray, config: VisionConfig, pad_to: int | None = None,
                  max_frame_patches: int | None = None) -> VisionLayout:
  """Layout of one vision-tower call over several images / videos (host side, NumPy).

  Args:
    grid_thw: [n, 3] (t, h, w) patch grids, in the order of the concatenated pixel_values.
    config: the vision config (patch, merge and window sizes).
    pad_to: pad the patch count N to this (a multiple of merge**2, >= the real count) so that
      jitted shapes are bucketed; the padding patches never touch real outputs. The merged
      output then has `pad_to / merge**2` rows, the real ones first (`merged_valid`).
    max_frame_patches: row length of the full-attention blocks (the largest h*w a frame may
      have). None = the largest frame of these grids. Pass it with `pad_to` so that the
      shapes depend only on (pad_to, max_frame_patches).
  """
  m2 = config.spatial_merge_size ** 2
  grid = _check_grid(grid_thw, config.spatial_merge_size)
  n_real = int(grid.prod(-1).sum())
  n = n_real if pad_to is None else int(pad_to)
  if n < n_real or n % m2:
    raise ValueError(f"pad_to={pad_to}: must be a multiple of {m2} and >= the {n_real} patches "
                     f"of grids {grid.tolist()}")
  merged_idx, win_lengths = window_index(grid, config)
  m_real, m_all = n_real // m2, n // m2
  merged_perm = np.concatenate([merged_idx, np.arange(m_real, m_all)])
  window_perm = (merged_perm[:, None] * m2 + np.arange(m2)).ravel()
  rot = np.zeros((n, 2), np.int32)
  rot[:n_real] = rotary_positions(grid, config.spatial_merge_size)[window_perm[:n_real]]

  frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
  win_len = (config.window_size // config.patch_size) ** 2
  full_len = int(max_frame_patches or (frame_lengths.max() if frame_lengths.size else m2))
  bucket = lambda row_len: None if pad_to is None else max(1, 2 * math.ceil(n / row_len))
  return VisionLayout(
      rotary_pos=rot,
      window_perm=window_perm.astype(np.int32),
      merge_inverse=np.argsort(merged_perm, kind="stable").astype(np.int32),
      merged_valid=np.arange(m_all) < m_real,
      windowed=pack_segments(win_lengths, n, win_len, bucket(win_len), kind="windowed"),
      full=pack_segments(frame_lengths, n, full_len, bucket(full_len), kind="full"))
