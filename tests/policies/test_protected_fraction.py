"""budget.protected_fraction: the recent window shrinks with the budget, so high ratios keep scored tokens."""

import pytest
import torch

from kvcompress.budget import Budget, BudgetError
from kvcompress.compressor import Compressor
from kvcompress.model_runner import ModelRunner, make_cache
from kvcompress.policies.lfu import LFUPolicy


def test_window_is_capped_at_a_share_of_the_per_head_budget() -> None:
    fixed = Budget(ratio=16, protected_window=32)
    scaled = Budget(ratio=16, protected_window=32, protected_fraction=0.25)
    assert fixed.protected(1000) == 32
    assert scaled.protected(1000) == 15  # floor(0.25 x 62.5)
    assert scaled.protected(10_000) == 32  # a large budget keeps the whole window
    with pytest.raises(BudgetError, match="smaller than the protected tokens"):
        fixed.check(400)  # 25 tokens per head < 32
    scaled.check(400)  # window 6
    with pytest.raises(BudgetError, match="protected_fraction must be null"):
        Budget(protected_fraction=1.5)


def test_compressor_protects_the_scaled_window(tiny_llama) -> None:
    n = 160
    budget = Budget(ratio=16, protected_window=32, protected_fraction=0.5)  # 10 per head, window 5
    comp = Compressor(LFUPolicy(window=8), budget)
    runner = ModelRunner(tiny_llama, make_cache(tiny_llama, 1, n + 8))
    s = runner.cache.add_sequence()
    ids = torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    runner.forward([s], [ids], comp, comp.window)
    comp.compress(runner.cache, [s])
    for layer in range(runner.cache.num_layers):
        v = runner.cache.view(layer, [s], with_kv=False)
        for h in range(runner.cache.num_kv_heads):
            pos = set(v.positions[0, h][v.valid[0, h]].tolist())
            assert len(pos) == 10
            assert set(range(n - 5, n)) <= pos, "scaled protected window evicted"
