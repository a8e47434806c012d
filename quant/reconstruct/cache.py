"""A bounded micro-batch cache of one unit's reconstruction data (inputs and targets), CPU and disk.

Rows arrive in micro-batches (``add``: a dict of name -> tensor with rows along dim 0). They are kept on the CPU
until the next micro-batch would take the resident bytes past ``budget_bytes``; the resident rows are then
written to ``cache_dir`` as one shard and dropped. ``batches`` streams training batches: it walks the shards one
at a time (only one is ever resident), giving each a share of the iterations proportional to its rows and
drawing every batch at random from the resident shard. When all rows fit, nothing touches the disk and every
batch is drawn from all rows. So memory never exceeds the budget, whatever the calibration size; the price of a
small budget is that a batch mixes rows of one shard only (the rows are shuffled before they are cached, so each
shard is a random subset). ``dtype`` (e.g. torch.float16) stores floating tensors at that precision and returns
them in their own dtype, halving memory and disk at the price of rounding the cached inputs/targets. Files of a
closed cache are removed.
"""
import os
import uuid

import torch

from ldm.util import UserError, atomic_save


def _nbytes(batch):
    return sum(t.numel() * t.element_size() for t in batch.values())


class UnitCache:
    def __init__(self, budget_bytes, cache_dir, dtype=None):
        if budget_bytes <= 0:
            raise UserError(f"the reconstruction cache budget must be positive, got {budget_bytes} bytes.")
        self.budget = int(budget_bytes)
        self.cache_dir = os.fspath(cache_dir)
        self._tag = uuid.uuid4().hex[:8]
        self._resident = []          # micro-batches (dicts) of the shard being filled / read
        self._resident_bytes = 0
        self.peak_bytes = 0
        self.shards = []             # (path or None for the resident one, rows)
        self._keys = None
        self._dtypes = {}            # key -> dtype handed back by batches()
        self.dtype = dtype
        self.rows = 0

    # -- filling ------------------------------------------------------------------------------------------
    def add(self, batch):
        if not self._dtypes:
            self._dtypes = {k: v.dtype for k, v in batch.items()}
        batch = {k: v.detach().to("cpu", self.dtype if self.dtype and v.is_floating_point() else v.dtype)
                 .contiguous() for k, v in batch.items()}
        rows = {int(v.shape[0]) for v in batch.values()}
        if len(rows) != 1:
            raise ValueError(f"a cached micro-batch needs one row count, got {sorted(rows)}")
        if self._keys is None:
            self._keys = sorted(batch)
        elif sorted(batch) != self._keys:
            raise ValueError("every cached micro-batch must hold the same tensors")
        size = _nbytes(batch)
        if size > self.budget:
            raise UserError(f"one micro-batch of reconstruction data takes {size / 2**20:.1f} MiB, more than the "
                            f"cache budget of {self.budget / 2**20:.1f} MiB; raise max_cache_gb or lower the "
                            "micro-batch size.")
        if self._resident_bytes + size > self.budget:
            self._spill()
        self._resident.append(batch)
        self._resident_bytes += size
        self.peak_bytes = max(self.peak_bytes, self._resident_bytes)
        self.rows += rows.pop()

    def _spill(self):
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"shard-{self._tag}-{len(self.shards):05d}.pt")
        atomic_save(self._resident, path)
        self.shards.append((path, sum(int(b[self._keys[0]].shape[0]) for b in self._resident)))
        self._drop()

    def _drop(self):
        self._resident, self._resident_bytes = [], 0

    def resident_tensors(self):
        """The tensors held in memory right now (for accounting and tests)."""
        return [t for b in self._resident for t in b.values()]

    @property
    def spilled(self):
        return any(path is not None for path, _ in self.shards)

    # -- reading ------------------------------------------------------------------------------------------
    def _seal(self):
        """After the last add: the still-resident rows become the last shard (kept in memory)."""
        if self._resident and (not self.shards or self.shards[-1][0] is not None):
            self.shards.append((None, sum(int(b[self._keys[0]].shape[0]) for b in self._resident)))

    def _load(self, path):
        self._drop()
        self._resident = torch.load(path, map_location="cpu", weights_only=True)
        self._resident_bytes = sum(_nbytes(b) for b in self._resident)
        self.peak_bytes = max(self.peak_bytes, self._resident_bytes)

    def _gather(self, idx):
        starts, offset = [], 0
        for b in self._resident:
            starts.append(offset)
            offset += int(b[self._keys[0]].shape[0])
        out = {}
        chunk = torch.searchsorted(torch.tensor(starts), idx, right=True) - 1
        for k in self._keys:
            out[k] = torch.stack([self._resident[int(c)][k][int(i) - starts[int(c)]]
                                  for c, i in zip(chunk, idx)]).to(self._dtypes[k])
        return out

    def batches(self, n_iters, batch_size, generator):
        """Yield ``n_iters`` batches of ``batch_size`` random rows (all rows of a smaller shard)."""
        if self.rows == 0:
            raise ValueError("the cache is empty")
        self._seal()
        # the resident shard first (no reload), then the spilled ones in order
        order = sorted(range(len(self.shards)), key=lambda i: self.shards[i][0] is not None)
        cum, done = 0, 0
        for i in order:
            path, rows = self.shards[i]
            cum += rows
            share = round(n_iters * cum / self.rows) - done
            if share <= 0:
                continue
            if path is not None:
                self._load(path)
            for _ in range(share):
                idx = torch.randperm(rows, generator=generator)[:batch_size]
                yield self._gather(idx)
            done += share

    def close(self):
        self._drop()
        for path, _ in self.shards:
            if path is not None and os.path.exists(path):
                os.remove(path)
        self.shards = []


def clear_dir(cache_dir):
    """Remove a cache directory's shard files (the leftovers of a killed run)."""
    if os.path.isdir(cache_dir):
        for entry in os.scandir(cache_dir):
            if entry.name.startswith("shard-") or entry.name.startswith(".tmp-"):
                os.remove(entry.path)

