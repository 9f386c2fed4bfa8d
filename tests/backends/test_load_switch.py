"""While a kernel package loads on a background thread, the interpreter hands the GIL over every
0.5 ms instead of 5 ms (issue 31, item 1: a caller's 0.5 ms call that gave the GIL up waited up to
5 ms for a Python-heavy import to give it back); the interval is put back after the last load."""
import sys
import threading

import pytest

from diffsynth_attention.backends import loading
from diffsynth_attention.backends.flash_attention import FlashAttention3


class GatedFA3(FlashAttention3):
    """Installed, and its import waits for ``gate``."""
    gate = None

    def _declare(self):
        return (None, "3.0.0")

    def _load(self):
        self.gate.wait(20)


@pytest.fixture
def interval():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield
    sys.setswitchinterval(before)


def _loading(gate, name="flash_attention_3"):
    backend = type("Gated", (GatedFA3,), {"gate": gate, "name": name})()
    assert loading.start_loading(backend) == loading.LOADING
    return backend


def test_the_switch_interval_is_lowered_while_packages_load_and_put_back_after_the_last(interval):
    gates = [threading.Event(), threading.Event()]
    try:
        first, second = _loading(gates[0]), _loading(gates[1], "flash_attention_4")
        assert sys.getswitchinterval() == pytest.approx(loading.LOAD_SWITCH_INTERVAL_S)
        gates[0].set()
        loading.wait(first, 20)
        assert sys.getswitchinterval() == pytest.approx(loading.LOAD_SWITCH_INTERVAL_S)  # one still loads
        gates[1].set()
        loading.wait(second, 20)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        for gate in gates:
            gate.set()


def test_an_interval_changed_meanwhile_is_left_alone(interval):
    gate = threading.Event()
    try:
        backend = _loading(gate)
        sys.setswitchinterval(0.002)  # the application's own setting
        gate.set()
        loading.wait(backend, 20)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        gate.set()


def test_the_garbage_collector_pauses_while_packages_load(interval):
    """FlashAttention-4's import ran 431 full-heap collections on an H100, stalling the caller's
    calls 639 times: the collector is off while any package loads, on again after the last."""
    import gc

    assert gc.isenabled()
    gates = [threading.Event(), threading.Event()]
    try:
        first, second = _loading(gates[0]), _loading(gates[1], "flash_attention_4")
        assert not gc.isenabled()
        gates[0].set()
        loading.wait(first, 20)
        assert not gc.isenabled()  # one still loads
        gates[1].set()
        loading.wait(second, 20)
        assert gc.isenabled()
    finally:
        for gate in gates:
            gate.set()
        gc.enable()


def test_an_application_that_runs_without_the_collector_keeps_it_off(interval):
    import gc

    gate = threading.Event()
    gc.disable()
    try:
        backend = _loading(gate)
        gate.set()
        loading.wait(backend, 20)
        assert not gc.isenabled()
    finally:
        gate.set()
        gc.enable()


def test_a_load_that_never_ends_holds_the_collector_off_for_a_bounded_time(interval, monkeypatch):
    """A hung import must not leave the process without cyclic garbage collection, nor with the
    lowered switch interval: after LOAD_GC_PAUSE_MAX_S both are back, while the load still runs."""
    import gc
    import time

    monkeypatch.setattr(loading, "LOAD_GC_PAUSE_MAX_S", 0.3)
    gate = threading.Event()
    try:
        backend = _loading(gate)
        assert not gc.isenabled()
        deadline = time.monotonic() + 20
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc.isenabled() and loading.state(backend) == loading.LOADING
        assert sys.getswitchinterval() == 0.005  # the interval is put back with it, not at a last load that never ends
        gate.set()
        loading.wait(backend, 20)
        assert gc.isenabled()
    finally:
        gate.set()
        gc.enable()
