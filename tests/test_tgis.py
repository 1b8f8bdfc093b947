"""Stop-sequence text is held back exactly as long as it could still be a stop sequence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.pb.fmaas import generation_pb2 as pb
from proxy.tgis import StopTextHolder, matched_stop_sequence, stop_reason

text = st.text(alphabet="abcXY \n", max_size=30)


@given(text, st.lists(st.text(alphabet="abcXY \n", min_size=1, max_size=4), min_size=1, max_size=3), st.data())
def test_streamed_text_equals_full_text_minus_the_stop_sequence(
    body: str, stops: list[str], data: st.DataObject
) -> None:
    stop = data.draw(st.sampled_from(stops))
    full = body + stop  # TGI ends the text with the stop sequence that ended it
    cuts = sorted(data.draw(st.lists(st.integers(0, len(full)), max_size=8)))
    holder = StopTextHolder(stops)
    out, prev = [], 0
    for cut in [*cuts, len(full)]:
        out.append(holder.feed(full[prev:cut]))
        prev = cut
    matched = matched_stop_sequence(full, stops)
    out.append(holder.finish(matched))
    assert "".join(out) == full[: len(full) - len(matched)]


def test_without_a_stop_everything_comes_out() -> None:
    holder = StopTextHolder(["END"])
    assert holder.feed("the E") == "the "
    assert holder.feed("ND") == ""
    assert holder.feed("x") == "ENDx"  # not a stop after all: released as soon as that is certain
    assert holder.feed(" E") == " "
    assert holder.finish("") == "E"


def test_stop_reasons() -> None:
    assert stop_reason("length") == pb.MAX_TOKENS
    assert stop_reason("length", token_limited=True) == pb.TOKEN_LIMIT
    assert stop_reason("eos_token") == pb.EOS_TOKEN
    assert stop_reason("stop_sequence") == pb.STOP_SEQUENCE
    assert stop_reason(None) == pb.NOT_FINISHED
