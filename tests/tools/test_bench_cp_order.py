"""scripts/bench_cp.py's interleaved timing takes a new (seeded, identical on every rank) order each round, as
the tuner and the benchmarks' timer do: a rotation keeps each function behind the same one."""
import importlib.util

from support.harness import bench  # scripts/ on sys.path: bench_cp.py imports the harness
from support.subprocesses import ROOT


def test_bench_cp_rounds_are_not_a_rotation():
    spec = importlib.util.spec_from_file_location("bench_cp_under_test", ROOT / "scripts" / "bench_cp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = []

    class Clock:
        def time_ms(self, fn):
            fn()
            return 1.0

    names = ["a", "b", "c", "d"]
    mod.interleaved(Clock(), {n: (lambda n=n: seen.append(n)) for n in names}, rounds=8)
    rounds = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert rounds == [bench.round_order(names, i) for i in range(8)]
