"""Teacher-forced perplexity and greedy agreement on the long license text."""

from __future__ import annotations

import math

import pytest

from vllm_kvcompress.eval.long_text import DEFAULT_TEXT, read_long_text
from vllm_kvcompress.eval.perplexity import format_perplexity_table, perplexity_check
from vllm_kvcompress.eval.settings import settings_grid


@pytest.mark.skipif(not DEFAULT_TEXT.is_file(), reason="no GPL-3 text on this machine")
def test_perplexity_and_agreement(runner):
    token_ids = runner.tokenizer(read_long_text()).input_ids[:256 + 16]
    results = perplexity_check(runner, token_ids, prefix=256,
                               settings=settings_grid(["none", "streaming"], [32]))
    dense, compressed = results
    assert (dense.setting, dense.agreement, dense.num_tokens) == ("dense", 1.0, 16)
    assert compressed.setting == "streaming@32" and 0.0 <= compressed.agreement <= 1.0
    assert all(math.isfinite(r.perplexity) and r.perplexity >= 1.0 for r in results)
    assert "| streaming@32 |" in format_perplexity_table(results)
