"""proxy.input_counts: TGIS input counts from the model's tokenizer file, else from recent /tokenize answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from common.errors import ConfigError
from proxy.input_counts import InputCounts, load_tokenizer
from sim import tokenizer as sim_tokenizer

SIM = Tokenizer.from_str(sim_tokenizer.hf_tokenizer_json())

# Where Oniguruma's \w and Python's agree (sim.tokenizer.hf_tokenizer_json says where they do not): letters of every
# script, decimal digits, punctuation, math and currency symbols, spaces and the usual control whitespace.
TEXT = st.text(
    st.characters(categories=("Lu", "Ll", "Lo", "Nd", "Pc", "Pd", "Ps", "Pe", "Po", "Sm", "Sc", "Zs"))
    | st.sampled_from(" \t\n\r"),
    max_size=300,
)


@given(TEXT, st.integers(min_value=0, max_value=80))
def test_the_simulators_tokenizer_file_counts_as_the_simulator(text: str, truncate: int) -> None:
    counts = InputCounts({"m": SIM}, local_max_chars=10_000)
    n = sim_tokenizer.count_tokens(text)
    assert counts.get("m", text, truncate) == (min(n, truncate) if truncate else n)


def test_the_tokenizer_counts_before_the_cache_and_only_up_to_its_size() -> None:
    counts = InputCounts({"m": SIM}, local_max_chars=20)
    counts.put("m", "hello world", 99)  # a /tokenize answer that disagrees: the file is the model's own tokenizer
    assert counts.get("m", "hello world", 0) == sim_tokenizer.count_tokens("hello world")
    long = "word " * 5  # 25 characters: not tokenized on the event loop
    assert counts.get("m", long, 0) is None
    counts.put("m", long, 6)
    assert counts.get("m", long, 0) == 6
    assert counts.get("other", "hello world", 0) is None  # per model


def test_cached_counts_as_input_tokens_would_truncation_included() -> None:
    counts = InputCounts()
    assert counts.get("m", "hello", 0) is None
    counts.put("m", "hello", 7)
    assert counts.get("m", "hello", 0) == 7
    assert counts.get("m", "hello", 3) == 3  # TGI keeps the last 3
    assert counts.get("m", "hello", 7) == 7
    assert counts.get("m", "hello", 9) == 7
    assert counts.get("other", "hello", 0) is None  # per model


def test_cache_bounded_oldest_out_first_and_long_prompts_never_kept() -> None:
    counts = InputCounts(size=2, cached_max_chars=10)
    counts.put("m", "a", 1)
    counts.put("m", "b", 2)
    counts.put("m", "a", 1)  # already there: nothing goes out
    counts.put("m", "c", 3)
    assert [counts.get("m", t, 0) for t in "abc"] == [None, 2, 3]
    counts.put("m", "x" * 11, 5)
    assert counts.get("m", "x" * 11, 0) is None


def test_padding_and_truncation_in_the_file_do_not_reach_the_count(tmp_path: Path) -> None:
    """Model repositories ship tokenizer.json files with padding or truncation set; TGI counts without them."""
    spec = json.loads(sim_tokenizer.hf_tokenizer_json())
    spec["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<unk>"}  # fmt: skip
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    counts = InputCounts({"m": load_tokenizer(path, "models.0.tokenizer_file")})
    text = "hello there world, this is a longer prompt"
    assert counts.get("m", text, 0) == sim_tokenizer.count_tokens(text)
    assert counts.get("m", text, 5) == 5


@pytest.mark.parametrize("content", [None, "", "{not json", json.dumps({"model": {"type": "Nope"}})])
def test_a_tokenizer_file_that_cannot_load_is_a_config_error_naming_the_setting(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"models\.0\.tokenizer_file: cannot load .*tokenizer\.json"):
        load_tokenizer(path, "models.0.tokenizer_file")


class _Raising:
    """A tokenizer whose encode raises, as the tokenizers library does with a bare Exception (no real input is known
    to do it): the count is informative, so it must never fail a call."""

    def encode(self, text: str) -> object:
        raise Exception("tokenizers raises bare Exceptions")


def test_a_tokenizer_that_raises_counts_nothing_and_the_cache_or_backend_answers() -> None:
    counts = InputCounts({"m": _Raising()})  # type: ignore[dict-item]
    assert counts.tokenizes("m", "hello world")
    assert counts.count("m", "hello world", 0) is None
    assert counts.get("m", "hello world", 0) is None  # the caller asks the backend's /tokenize
    counts.put("m", "hello world", 7)
    assert counts.get("m", "hello world", 0) == 7
