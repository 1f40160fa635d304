"""Flat resident memory over 10^4 calls of each op, and 8 threads at once getting one thread's
results bit for bit, on the CPU kernel and the fallback (tools/soak.py, which prints the figures)."""

from __future__ import annotations

import importlib.util
import os
import threading

import pytest
import torch
from conftest import kernel_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "tools", "soak.py"))
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)

pytestmark = pytest.mark.skipif(not kernel_available(), reason="needs the compiled CPU kernel")


def test_resident_memory_flat_over_ten_thousand_calls_of_each_op() -> None:
    assert soak.run_memory(calls=10_000, margin_mib=2.0) == []


@pytest.mark.parametrize("fallback", [False, True], ids=["cpu-kernel", "fallback"])
def test_eight_threads_get_one_threads_results_bit_for_bit(fallback: bool) -> None:
    assert soak.run_threads(threads=8, rounds=1, fallback=fallback) == []


def test_the_thread_check_sees_a_thread_dependent_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker itself: a result that depends on the calling thread must be reported.
    cases = [("thread id", lambda: (torch.tensor([threading.get_ident() % 1000], dtype=torch.float32),))]
    monkeypatch.setattr(soak, "thread_cases", lambda fallback: cases)
    assert soak.run_threads(threads=4, rounds=1, fallback=False)
