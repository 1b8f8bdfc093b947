"""proxy.prompt_scale: what a tenant's prompts count per four characters, learned from the backends' counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.job import Job
from proxy.prompt_scale import PromptScale


def test_a_tenant_whose_prompts_count_four_times_the_estimate_is_estimated_at_that() -> None:
    scale = PromptScale()
    assert scale.scale("acme", "m") == 1.0  # nothing counted yet: four characters a token
    scale.observe("acme", "m", chars=400, counted=401)  # 400 commas: one token a character, and a BOS
    assert scale.scale("acme", "m") == pytest.approx(4.01)
    assert scale.scale("acme", "other-model") == 1.0 and scale.scale("globex", "m") == 1.0  # per tenant and model
    job = Job(request_id="r", model_id="m", tenant="acme", inputs="," * 400, body={})
    assert job.prompt_tokens_estimate == 100
    job.prompt_scale = scale.scale("acme", "m")
    assert job.prompt_tokens_estimate == 401


def test_a_tenant_that_changes_what_it_sends_is_followed_within_a_few_calls() -> None:
    scale = PromptScale(decay=0.8)
    for _ in range(50):
        scale.observe("acme", "m", chars=4000, counted=900)  # English prose: 0.9 counted per estimated token
    assert scale.scale("acme", "m") == 1.0  # never below four characters a token
    calls = 0
    while scale.scale("acme", "m") <= 3.6 and calls < 30:
        scale.observe("acme", "m", chars=4000, counted=4000)  # then punctuation: 4
        calls += 1
    assert calls <= 12  # within about 1 / (1 - decay) calls' worth of tokens, not after the long history


def test_the_scale_is_bounded_and_counts_of_nothing_teach_nothing() -> None:
    scale = PromptScale()
    scale.observe("a", "m", chars=4, counted=1000)
    assert scale.scale("a", "m") == 16.0
    scale.observe("b", "m", chars=100_000, counted=1)  # a run of spaces: one token
    assert scale.scale("b", "m") == 1.0  # cannot teach an estimate below four characters a token...
    scale.observe("b", "m", chars=400, counted=401)
    assert scale.scale("b", "m") < 1.1  # ...though it dilutes what follows, as prose would (the settling pays)
    scale.observe("c", "m", chars=0, counted=10)  # a chat call (no inputs text) or a count of nothing
    scale.observe("c", "m", chars=10, counted=0)
    assert scale.scale("c", "m") == 1.0
    small = PromptScale(max_keys=3)
    for i in range(10):
        small.observe(f"t{i}", "m", chars=400, counted=200)
    assert len(small._sums) <= 3


@given(
    calls=st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)), min_size=1, max_size=40),
)
def test_the_scale_lies_between_the_calls_own_ratios(calls: list[tuple[int, int]]) -> None:
    """A decayed, token-weighted mean of the calls' own ratios (before the bounds): never outside their range."""
    scale = PromptScale(lo=0.0, hi=float("inf"))
    for chars, counted in calls:
        scale.observe("t", "m", chars=chars, counted=counted)
    ratios = [counted / (chars / 4) for chars, counted in calls]
    assert min(ratios) * (1 - 1e-9) <= scale.scale("t", "m") <= max(ratios) * (1 + 1e-9)
