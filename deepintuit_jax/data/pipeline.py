"""Grain input pipelines: training batches with exact resume, and evaluation batches.

Training (`make_train_loader`): the records (cut to a multiple of the process count) are a
Grain `MapDataset` of record indices, shuffled with a different order each epoch (Grain
folds the epoch into the seed) and repeated; this process takes every `process_count`-th
element from `process_index` on, so the global order (and each step's global batch) is the
same for any process count. Examples are built by `examples.ExampleBuilder` (video decode,
preprocessing, tokenisation) in worker processes (`num_workers`, 0 = in-process). The main
process takes examples in order, handles bad-sample markers (raise or count), and pads each
batch (`batching.collate`; with `groups=G` as G groups for data-parallel vision). The padded
shapes of a batch (length bucket, patch bucket) are agreed by every process
(`process_max`, only with several processes) so that their batches form one global array.
An epoch's last partial batch is dropped or padded with dummy
rows (`drop_remainder`). `get_state()` is taken between batches and is JSON-serialisable;
`set_state()` on a fresh loader built with the same arguments continues with exactly the
same batches. A worker process that dies (killed, e.g. by the out-of-memory killer) or runs
out of memory stops the loader with one line (`DataWorkerError`) naming the worker and the
item it waited for, never a hang; the last saved state still resumes exactly.

Evaluation (`make_eval_batches`): records in order (this process's shard), fixed slots of
`batch_size` records per batch, bad records replaced by dummy rows, so that every process
yields the same number of batches (ceil(ceil(n / process_count) / batch_size)).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from deepintuit_jax.core.errors import DataWorkerError
from deepintuit_jax.data import batching, chat
from deepintuit_jax.data.errors import BadSample, SkipLedger
from deepintuit_jax.data.examples import ExampleBuilder, PipelineOptions, marker_error
from deepintuit_jax.data.examples import PosMap as _PosMap

__all__ = ["PipelineOptions", "Loader", "make_train_loader", "make_eval_batches", "HOST_KEYS"]
HOST_KEYS = batching.HOST_KEYS
_STATE_VERSION = 1
log = logging.getLogger(__name__)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def process_max(values: tuple[int, ...]) -> tuple[int, ...]:
  """Element-wise max of `values` over all processes (a collective: every process must call
  it for every batch, in the same order). One process: `values` unchanged, no sync."""
  import jax
  if jax.process_count() == 1:
    return tuple(int(v) for v in values)
  from jax.experimental import multihost_utils
  got = multihost_utils.process_allgather(np.asarray(values, np.int32))
  return tuple(int(v) for v in np.asarray(got).reshape(-1, len(values)).max(axis=0))


def _builder(records, tokenizer, model_config, options, for_generation) -> ExampleBuilder:
  v = model_config.vision
  return ExampleBuilder(records, tokenizer, options, patch_size=v.patch_size,
                        temporal_patch_size=v.temporal_patch_size,
                        merge_size=v.spatial_merge_size, for_generation=for_generation)


def _unexpected(marker: dict[str, Any]) -> RuntimeError:
  item_id, path, msg, tb = marker["error"]
  return RuntimeError(f"data pipeline failed on item {item_id!r} (file {path!r}): {msg}\n{tb}")


_LOWER = ("lower data.num_workers, data.max_pixels or data.max_frames, or give the job more "
          "memory; a rerun resumes from the latest checkpoint")


def _worker(pos: int | None, num_workers: int) -> str:
  """Grain's worker k takes the stream's elements k, k + W, ... (interleaved in turn)."""
  if not num_workers:
    return "the main process"
  return (f"data worker {pos % num_workers} of {num_workers}" if pos is not None
          else f"one of the {num_workers} data workers")


def _failed(marker: dict[str, Any], num_workers: int) -> None:
  """Raises for an example that is neither built nor a bad sample: a bug (`"error"`: with its
  traceback) or a MemoryError (`"oom"`: one line naming the item)."""
  if "error" in marker:
    raise _unexpected(marker)
  if "oom" in marker:
    item_id, path = marker["oom"]
    raise DataWorkerError(f"out of memory in {_worker(marker['pos'], num_workers)} while "
                          f"preparing item {item_id!r} (file {path!r}); {_LOWER}")


def _next_example(it: Iterator, pos: int | None, num_workers: int,
                  item: Callable[[int], str]) -> dict[str, Any]:
  """next(it), with a worker process that died (Grain: "Worker process was terminated
  unexpectedly with exit code N") or a MemoryError as a one-line `DataWorkerError` naming the
  worker and `item(pos)`, the item the loader waited for (the worker died on it or, reading
  ahead, on a later one), instead of a traceback. pos: the stream position awaited (None:
  unknown)."""
  try:
    return next(it)
  except MemoryError:
    raise DataWorkerError(f"out of memory in {_worker(pos, num_workers)} at or after "
                          f"{item(pos)}; {_LOWER}") from None
  except RuntimeError as e:
    m = re.search(r"terminated unexpectedly with exit code (-?\d+)", str(e))
    if m is None:
      raise
    code = int(m.group(1))
    how = ("was killed (SIGKILL: the out-of-memory killer, or by hand)" if code == -9 else
           f"was killed by signal {-code}" if code < 0 else f"exited with code {code}")
    raise DataWorkerError(f"{_worker(pos, num_workers)} {how} at or after {item(pos)} (the "
                          f"item the loader waited for; workers read ahead); {_LOWER}") from None


def _describe(records: Sequence[Any], index: int | None) -> str:
  if index is None:
    return "the next item"
  rec = records[int(index)]
  return (f"item {getattr(rec, 'item_id', None)!r} (file {getattr(rec, 'video', None)!r}, "
          f"record {int(index)})")


def _mp_prefetch(it_ds, num_workers: int, per_worker_buffer_size: int = 1):
  """Grain worker processes. Grain reads absl flags; outside an absl app (notebooks, tests)
  they are unparsed, so their defaults are taken (marking them parsed) first."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it_ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=per_worker_buffer_size))


class Loader:
  """Iterator of training batches (see the module docstring). Close it when done."""

  def __init__(self, builder: ExampleBuilder, indices: Sequence[int], *, model_config,
               options: PipelineOptions, batch_size: int, num_epochs: int | None,
               pad_id: int, ledger: SkipLedger | None = None, process_index: int = 0,
               groups: int = 1, process_count: int = 1,
               shape_sync: Callable[[tuple[int, int]], tuple[int, int]] | None = process_max):
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive")
    if groups < 1 or batch_size % groups:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of groups={groups}")
    self.groups, self.shape_sync = groups, shape_sync
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs={num_epochs} must be positive or None (forever)")
    if not indices:
      raise ValueError("no records for this process (empty dataset or fewer records than "
                       "processes)")
    self.options, self.batch_size, self.num_epochs = options, batch_size, num_epochs
    self.model_config, self.pad_id, self.process_index = model_config, pad_id, process_index
    self.epoch_size = len(indices) // process_count  # this process's share
    self.ledger = ledger if ledger is not None else SkipLedger()
    self.epoch_ledger = SkipLedger()
    self.epoch_summaries: list[str] = []
    ds = grain.MapDataset.source(list(indices))
    if options.shuffle:
      ds = ds.shuffle(seed=options.seed)
    ds = ds.repeat(num_epochs)
    if process_count > 1:  # after the shuffle: one global order, interleaved over processes
      ds = ds[process_index::process_count]
    self._order, self._records, self._next_pos = ds, builder.records, 0
    ds = ds.map_with_index(_PosMap(builder))  # pos: this process's position
    buffer = max(1, options.prefetch_batches * batch_size)
    # With workers, each worker's own read-ahead stays small; the worker buffers hold the rest.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=options.num_threads,
        prefetch_buffer_size=options.num_threads if options.num_workers else buffer))
    if options.num_workers > 0:
      per_worker = max(1, -(-buffer // options.num_workers))
      it_ds = _mp_prefetch(it_ds, options.num_workers, per_worker)
    self._iter = iter(it_ds)
    self._done = False

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch when nothing is skipped."""
    full, rest = divmod(self.epoch_size, self.batch_size)
    return full + (1 if rest and not self.options.drop_remainder else 0)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._done:
      raise StopIteration
    buf: list[dict[str, Any]] = []
    while len(buf) < self.batch_size:
      try:
        el = _next_example(self._iter, self._next_pos, self.options.num_workers, self._item)
      except StopIteration:
        self._done = True
        if buf and not self.options.drop_remainder:
          break
        raise
      self._next_pos = el["pos"] + 1
      _failed(el, self.options.num_workers)
      if "bad" in el:
        err = marker_error(el)
        if self.options.on_bad_sample == "error":
          raise err
        self.ledger.add(err)
        self.epoch_ledger.add(err)
      else:
        buf.append(el)
      if el["pos"] % self.epoch_size == self.epoch_size - 1:
        self._end_epoch(el["pos"] // self.epoch_size)
        if len(buf) < self.batch_size and self.options.drop_remainder:
          buf = []  # an epoch's partial batch is dropped
        elif buf:
          break
    return self._collate(buf)

  def _item(self, pos: int | None) -> str:
    try:
      return _describe(self._records, None if pos is None else self._order[pos])
    except IndexError:  # past the last epoch
      return _describe(self._records, None)

  def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
    length, patches = batching.shape_needs(examples, batch_size=self.batch_size,
                                           options=self.options, groups=self.groups)
    if self.shape_sync is not None:
      length, patches = self.shape_sync((length, patches))
    return batching.collate(examples, batch_size=self.batch_size, options=self.options,
                            model_config=self.model_config, pad_id=self.pad_id,
                            groups=self.groups if self.groups > 1 else None, length=length,
                            patches=patches)

  def _end_epoch(self, epoch: int) -> None:
    text = (f"[data, process {self.process_index}] epoch {epoch} done: "
            f"{self.epoch_ledger.summary()}")
    print(text, flush=True)
    self.epoch_summaries.append(text)
    self.epoch_ledger = SkipLedger()

  def skip_summary(self) -> str:
    """The skipped-sample counts so far (all epochs, record-loading skips included)."""
    return self.ledger.summary()

  def skip_metrics(self, prefix: str = "skipped") -> dict[str, int]:
    """{"skipped/total": n, "skipped/<kind>": n} for the metrics file."""
    return self.ledger.as_metrics(prefix)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state between two batches."""
    return {"version": _STATE_VERSION, "grain": self._iter.get_state(), "done": self._done,
            "next_pos": self._next_pos, **self._fingerprint(),
            "skipped": dict(self.ledger.counts), "skipped_examples": self.ledger.examples,
            "epoch_skipped": dict(self.epoch_ledger.counts),
            "epoch_skipped_examples": self.epoch_ledger.examples}

  def _fingerprint(self) -> dict[str, Any]:
    """What must match for a saved position to mean the same batches."""
    o = self.options
    return {"epoch_size": self.epoch_size, "batch_size": self.batch_size,
            "num_epochs": self.num_epochs, "num_workers": o.num_workers, "seed": o.seed,
            "shuffle": o.shuffle, "drop_remainder": o.drop_remainder}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `get_state()` of a loader built with the same arguments."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                       f"{_STATE_VERSION}")
    for key, value in self._fingerprint().items():
      if state.get(key) != value:
        raise ValueError(f"data iterator state has {key}={state.get(key)!r}, this loader "
                         f"{value!r}: the data, process count, batch size, workers or "
                         "shuffling changed, so the saved position means something else")
    self._iter.set_state(state["grain"])
    self._done = bool(state["done"])
    self._next_pos = state.get("next_pos")  # only for messages; absent in older states
    for ledger, counts, ex in ((self.ledger, "skipped", "skipped_examples"),
                               (self.epoch_ledger, "epoch_skipped", "epoch_skipped_examples")):
      ledger.counts.clear()
      ledger.counts.update(state[counts])
      ledger.examples = {k: list(v) for k, v in state[ex].items()}

  def close(self) -> None:
    """Stops the worker processes (if any)."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "Loader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_train_loader(records: Sequence[Any], *, tokenizer, model_config,
                      options: PipelineOptions, batch_size: int, num_epochs: int | None = None,
                      ledger: SkipLedger | None = None, process_index: int | None = None,
                      process_count: int | None = None, groups: int = 1,
                      shape_sync: Callable[[tuple[int, int]], tuple[int, int]] | None = process_max,
                      for_generation: bool = False) -> Loader:
  """Training batches for this process.

  Args:
    records: annotation Records (`annotations.load_records`).
    tokenizer: with Qwen's special tokens, chat template (and `chat.add_special_tokens`).
    model_config: Qwen2_5_VLConfig (token ids, vision sizes for the layout and rope).
    options: PipelineOptions.
    batch_size: the per-process batch (= global batch / process_count).
    num_epochs: None = repeat forever (recommended on several hosts: every process then
      yields a batch whenever asked, whatever it skipped).
    ledger: a SkipLedger already holding record-loading skips (reported with the rest).
    process_index / process_count: default jax.process_index() / jax.process_count().
    groups: G > 1 = grouped batches (`batching.collate(groups=G)`): G = the data-parallel
      shards this process feeds (`sharding.local_data_groups(mesh)`); 1 = un-grouped.
    shape_sync: maps this process's (length bucket, patch bucket) to the ones every process
      uses; default `process_max` (a no-op on one process); None = no sync.
    for_generation: prompts only (ending with `<|im_start|>assistant\\n`, right-padded,
      labels kept; records need no response): GRPO's rollout prompts.
  """
  pi, pc = _process(process_index, process_count)
  indices = list(range(len(records) // pc * pc))  # the same count on every process
  return Loader(_builder(records, tokenizer, model_config, options, for_generation), indices,
                model_config=model_config, options=options, batch_size=batch_size,
                num_epochs=num_epochs, pad_id=chat.pad_id(tokenizer), ledger=ledger,
                process_index=pi, process_count=pc, groups=groups, shape_sync=shape_sync)


def make_eval_batches(records: Sequence[Any], *, tokenizer, model_config,
                      options: PipelineOptions, batch_size: int, for_generation: bool = True,
                      ledger: SkipLedger | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> Iterator[dict[str, Any]]:
  """Evaluation batches of this process's records, in order, decoded in-process or by
  `options.num_workers` workers.

  for_generation=True: prompts ending with `<|im_start|>assistant\\n`, left-padded (for the
  sampler; `rope_deltas` included); False: teacher-forced, right-padded as in training.
  Bad records follow `options.on_bad_sample`; skipped ones become dummy rows (item_id "").
  Every process yields ceil(ceil(len(records) / process_count) / batch_size) batches.
  """
  pi, pc = _process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  indices = list(range(pi, len(records), pc))
  n_batches = -(-(-(-len(records) // pc)) // batch_size)
  builder = _builder(records, tokenizer, model_config, options, for_generation)
  ledger = ledger if ledger is not None else SkipLedger()
  pad = chat.pad_id(tokenizer)
  ds = grain.MapDataset.source(indices).map_with_index(_PosMap(builder))
  buffer = max(1, options.prefetch_batches * batch_size)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=options.num_threads,
      prefetch_buffer_size=options.num_threads if options.num_workers else buffer))
  if options.num_workers > 0:
    it_ds = _mp_prefetch(it_ds, options.num_workers, max(1, -(-buffer // options.num_workers)))
  it = iter(it_ds)
  item = lambda pos: _describe(records, indices[pos] if pos < len(indices) else None)
  try:
    for b in range(n_batches):
      got = []
      for k in range(max(0, min(batch_size, len(indices) - b * batch_size))):
        el = _next_example(it, b * batch_size + k, options.num_workers, item)
        _failed(el, options.num_workers)
        if "bad" in el:
          err: BadSample = marker_error(el)
          if options.on_bad_sample == "error":
            raise err
          ledger.add(err)
        else:
          got.append(el)
      if got:
        yield batching.collate(got, batch_size=batch_size, options=options,
                               model_config=model_config, pad_id=pad, left_pad=for_generation)
      else:
        yield _dummy_batch(batch_size, pad, for_generation)
    if ledger.total:
      print(f"[data, process {pi}] eval: {ledger.summary()}", flush=True)
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def _dummy_batch(batch_size: int, pad: int, left_pad: bool) -> dict[str, Any]:
  """A batch of only dummy rows (a process with nothing left to evaluate), no video."""
  import numpy as np
  ids = np.full((batch_size, 1), pad, np.int32)
  ones = np.ones((batch_size, 1), np.int32)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": np.zeros_like(ids),
          "position_ids": np.zeros((3, batch_size, 1), np.int32),
          "rope_deltas": np.zeros((batch_size,), np.int32),
          "pixel_values_videos": None, "video_grid_thw": None, "second_per_grid_ts": None,
          "video_layout": None, "labels": [""] * batch_size, "item_id": [""] * batch_size,
          "num_real": 0}
