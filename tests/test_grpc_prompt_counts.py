"""proxy.grpc_api.PromptCounts: the backend's counts of recent prompts, for TGIS's first stream message."""

from __future__ import annotations

from proxy.grpc_api import PromptCounts


def test_counts_as_input_tokens_would_truncation_included() -> None:
    counts = PromptCounts()
    assert counts.get("m", "hello", 0) is None
    counts.put("m", "hello", 7)
    assert counts.get("m", "hello", 0) == 7
    assert counts.get("m", "hello", 3) == 3  # TGI keeps the last 3
    assert counts.get("m", "hello", 7) == 7
    assert counts.get("m", "hello", 9) == 7
    assert counts.get("other", "hello", 0) is None  # per model


def test_bounded_oldest_out_first_and_long_prompts_never_kept() -> None:
    counts = PromptCounts(size=2, max_chars=10)
    counts.put("m", "a", 1)
    counts.put("m", "b", 2)
    counts.put("m", "a", 1)  # already there: nothing goes out
    counts.put("m", "c", 3)
    assert [counts.get("m", t, 0) for t in "abc"] == [None, 2, 3]
    counts.put("m", "x" * 11, 5)
    assert counts.get("m", "x" * 11, 0) is None
