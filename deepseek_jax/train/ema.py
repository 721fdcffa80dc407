"""An exponential moving average of the parameters kept in host memory (DeepSeek-V3 section 3.2.3).

The device never holds the EMA: each update copies the step's parameters to the host and folds them in
on a background thread, so the training loop does not wait for it. Updates are applied in order.
"""

from __future__ import annotations

import concurrent.futures

import jax
import numpy as np


class HostEMA:
    """ema <- decay * ema + (1 - decay) * params, float32 NumPy leaves."""

    def __init__(self, params, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1) (use 0 to disable the EMA).")
        self.decay = decay
        self._ema = jax.tree.map(lambda p: np.array(p, np.float32), jax.device_get(params))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: list[concurrent.futures.Future] = []

    def update(self, params) -> None:
        """Schedules one EMA update with these (device) params; returns at once."""
        for leaf in jax.tree.leaves(params):
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
