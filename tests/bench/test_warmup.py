"""Warm-up runs: every system (or ratio) runs untimed before the timed repeats, so that on CUDA the first run's
Triton JIT compilation lands in no figure, and a resumed sweep warms up only what it still measures."""

from __future__ import annotations

import kvcompress.bench.throughput as throughput
from kvcompress.bench.generation import time_systems
from kvcompress.bench.throughput import Workload, throughput_sweep


def test_time_systems_runs_each_system_untimed_first() -> None:
    calls: list[str] = []
    systems = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b")}
    times, outputs = time_systems(systems, repeats=3, warmup=2)
    assert calls[:4] == ["a", "b", "a", "b"] and len(calls) == 4 + 6
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3}
    assert outputs == {"a": "a", "b": "b"}


def test_throughput_sweep_warms_up_only_ratios_left_to_measure(tiny_llama, smollm2_tokenizer, monkeypatch) -> None:
    measured: list[object] = []
    monkeypatch.setattr(
        throughput, "measure_throughput", lambda model, prompts, comp, workload: measured.append(comp) or {"x": 1}
    )
    workload = Workload(n_requests=2, prompt_tokens=200, new_tokens=2)
    rows = throughput_sweep(
        tiny_llama, smollm2_tokenizer, [1.0, 4.0], lambda ratio: ratio, workload, repeats=2, done={(1.0, 0), (1.0, 1)},
        warmup=1,
    )  # fmt: skip
    assert measured == [4.0, 4.0, 4.0]  # ratio 1 is done: no warm-up and no rows; ratio 4: one warm-up + 2 rows
    assert [(r["ratio"], r["repeat"], r["warmup"]) for r in rows] == [(4.0, 0, 1), (4.0, 1, 1)]
