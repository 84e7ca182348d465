"""tst_titan/device.py: the bends of torchtitan that are not the CPU shims' device rebinding."""

from __future__ import annotations

import time

import torchtitan.train

from tst_titan.device import skip_final_sleep


def test_skip_final_sleep_drops_only_torchtitan_trains_sleep():
    real = torchtitan.train.time
    try:
        skip_final_sleep()
        skip_final_sleep()  # idempotent
        t0 = time.perf_counter()
        torchtitan.train.time.sleep(5)
        assert time.perf_counter() - t0 < 0.5
        # everything else of the module still is time's: the trainer's data-load timer
        assert torchtitan.train.time.perf_counter is time.perf_counter
        assert torchtitan.train.time.monotonic is time.monotonic
        assert time.sleep is not torchtitan.train.time.sleep  # the real module is untouched
    finally:
        torchtitan.train.time = real
