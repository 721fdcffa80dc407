"""An exponential moving average of the parameters kept in host memory (DeepSeek-V3 section 3.2.3).

The device never holds the EMA: each update copies the step's parameters to the host and folds them in
on a background thread, so the training loop does not wait for it. Updates are applied in order.
With several processes, params sharded across them are first all-gathered (on the calling thread, as
collectives must run in the same order everywhere): every host keeps the whole EMA, which costs a
gather per step; set train.ema_decay=0 for models too large for that.
"""

from __future__ import annotations

import concurrent.futures

import jax
import numpy as np
from jax.experimental import multihost_utils


def _fetchable(params):
    """`params` with every leaf readable by this process (gathered from the others if needed)."""
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)):
        return params
    return multihost_utils.process_allgather(params, tiled=True)


class HostEMA:
    """ema <- decay * ema + (1 - decay) * params, float32 NumPy leaves."""

    def __init__(self, params, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1) (use 0 to disable the EMA).")
        self.decay = decay
        self._ema = jax.tree.map(lambda p: np.array(p, np.float32), jax.device_get(_fetchable(params)))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: list[concurrent.futures.Future] = []

    def update(self, params) -> None:
        """Schedules one EMA update with these (device) params; returns at once."""
        params = _fetchable(params)
        for leaf in jax.tree.leaves(params):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(self._fold, params))

    def _fold(self, params) -> None:
        host = jax.device_get(params)
        d = self.decay
        self._ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * np.asarray(p, np.float32), self._ema, host)

    def value(self):
        """The EMA after every scheduled update (waits for them)."""
        for future in self._pending:
            future.result()
        self._pending = []
        return self._ema

    def restore(self, ema) -> None:
        self.value()
        self._ema = jax.tree.map(lambda e: np.array(e, np.float32), ema)

    def close(self) -> None:
        self.value()
        self._pool.shutdown()
