"""Reasoning apart from the answer: the splitter on awkward splits, and chat() on the
real server with a thinking block forced by a grammar."""

from __future__ import annotations

from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llamarocm
from llamarocm.reasoning import ReasoningSplitter, opens_reasoning, splitter_for
from llamarocm.stream import Token, _split_reasoning

pytestmark = pytest.mark.timeout(120)

GREEDY = {"temperature": 0.0, "top_k": 1}
# A thinking block forced on Gemma 3 270M, which never writes one by itself.
THINK_GRAMMAR = 'root ::= "<think>" [a-z]{3,12} " " [a-z]{3,12} "</think>" [A-Za-z]{3,12} " " [a-z]{3,12}'


def split(chunks: List[str], starts_in_reasoning: bool = False) -> Tuple[str, str]:
    """(reasoning, answer) of a reply fed in ``chunks``."""
    splitter = ReasoningSplitter(starts_in_reasoning)
    pieces = [piece for chunk in chunks for piece in splitter.feed(chunk)] + splitter.finish()
    return "".join(t for t, r in pieces if r), "".join(t for t, r in pieces if not r)


# -- the splitter --------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks, expected",
    [
        (["<think>", "plan", "</think>", "answer"], ("plan", "answer")),
        (["<think>\nplan it\n</think>\n\nThe answer."], ("plan it", "The answer.")),
        (["<th", "ink>pl", "an</th", "ink>ans"], ("plan", "ans")),
        (["<think>plan</think>answer", " more"], ("plan", "answer more")),
        (["\n <think>plan</think>answer"], ("plan", "answer")),
        (["<think>a </b> b</think>x"], ("a </b> b", "x")),
        (["<think>a </thinking> b</think>x"], ("a </thinking> b", "x")),
    ],
)
def test_a_reply_opening_with_think_is_split(chunks, expected):
    assert split(chunks) == expected


@pytest.mark.parametrize(
    "chunks",
    [["Hello <think>x</think> there"], ["<thin", "g>"], ["<b>bold</b>"], ["plain"], [" ", "leading space"]],
)
def test_a_reply_without_an_opening_block_is_all_answer(chunks):
    assert split(chunks) == ("", "".join(chunks))


def test_a_block_never_closed_is_all_reasoning():
    # As max_tokens cuts a reply mid-thought: nothing of it is an answer.
    assert split(["<think>still thinking </th"]) == ("still thinking </th", "")


def test_a_block_opened_by_the_prompt_ends_at_the_closing_tag():
    assert split(["\nplan", "</think>\n\nans"], starts_in_reasoning=True) == ("plan", "ans")
    # The model may still write the opening tag itself.
    assert split(["<think>plan</think>ans"], starts_in_reasoning=True) == ("plan", "ans")


def test_empty_and_whitespace_replies():
    assert split([]) == ("", "")
    assert split(["  "]) == ("", "  ")
    assert split(["<think></think>"]) == ("", "")


def test_once_the_answer_has_begun_text_passes_through_unchanged():
    # The stream stops feeding the splitter then: a plain chat reply costs nothing more.
    splitter = ReasoningSplitter()
    assert not splitter.passes_through
    splitter.feed("<think>a</think>\n")
    assert not splitter.passes_through  # the answer's leading whitespace is still dropped
    splitter.feed("x")
    assert splitter.passes_through and splitter.feed("<think>y") == [("<think>y", False)]
    assert ReasoningSplitter().feed("Hi") == [("Hi", False)]


def test_the_prompt_tells_whether_the_block_is_open():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n")
    assert not opens_reasoning("<think>\n\n</think>\n\n")
    assert splitter_for(False, "<think>") is None
    assert splitter_for(None, "x<think>\n").in_reasoning
    assert not splitter_for(None, "x").in_reasoning
    assert splitter_for(True, "x").in_reasoning
    with pytest.raises(TypeError, match="reasoning must be"):
        splitter_for("yes", "x")


REPLIES = st.tuples(
    st.text(alphabet=" \nab<>/", max_size=12).map(str.strip),  # reasoning: may hold tag-like text
    st.text(alphabet=" \nab<>/", max_size=12).map(str.strip),
).filter(lambda pair: "</think>" not in pair[0] and "<think>" not in pair[1][:7])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reply=REPLIES,
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12),
    lead=st.sampled_from(["", "\n", " \n"]),
)
def test_any_split_of_a_reply_gives_the_same_parts(reply, cuts, lead):
    reasoning, answer = reply
    text = f"{lead}<think>\n{reasoning}\n</think>\n\n{answer}"
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert split(chunks) == (reasoning, answer)
    assert split([text]) == (reasoning, answer)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab <>/think", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8))
def test_splitting_never_depends_on_where_the_pieces_break(text, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert split(chunks) == split([text])
    assert split(chunks, True) == split([text], True)


# -- tokens ----------------------------------------------------------------------


def test_tokens_are_marked_and_a_token_holding_both_parts_becomes_two():
    tokens = [Token("<think>", 1), Token("pl", 2, -0.5), Token("an</think>The", 3, -0.1), Token("</think>", 4)]
    parts: List[str] = []
    out = _split_reasoning(tokens, ReasoningSplitter(), parts)
    assert [(t.text, t.id, t.logprob, t.reasoning) for t in out] == [
        ("", 1, None, True),  # the tag: no text, its id kept
        ("pl", 2, -0.5, True),
        ("an", 3, -0.1, True),
        ("The", None, None, False),  # the answer's start: a token of its own
        ("</think>", 4, None, False),  # only the first closing tag counts
    ]
    assert parts == ["pl", "an"]


@settings(max_examples=200, deadline=None)
@given(reply=REPLIES, cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=12))
def test_tokens_of_any_split_keep_their_ids_in_order_and_the_parts(reply, cuts):
    reasoning, answer = reply
    text = f"<think>{reasoning}</think>{answer}"
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    tokens = [Token(text[a:b], i) for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))]
    splitter, parts = ReasoningSplitter(), []
    out = _split_reasoning(tokens, splitter, parts)
    rest = splitter.finish()
    out += [Token(t, reasoning=r) for t, r in rest]
    parts += [t for t, r in rest if r]
    assert [t.id for t in out if t.id is not None] == [t.id for t in tokens]  # none lost, none added
    assert "".join(t.text for t in out if t.reasoning) == reasoning == "".join(parts)
    assert "".join(t.text for t in out if not t.reasoning) == answer


def test_a_token_keeps_its_fields_and_defaults_to_answer():
    token = Token("x", 7)
    assert token.reasoning is False and token == ("x", 7, None, None, False)


# -- the real server ---------------------------------------------------------------


@pytest.mark.integration
def test_chat_separates_a_thinking_block_from_the_answer(shared_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    raw = shared_model.chat(messages, grammar=THINK_GRAMMAR, max_tokens=60, reasoning=False, **GREEDY).text()
    assert raw.startswith("<think>") and "</think>" in raw
    expected_reasoning, expected_answer = raw[len("<think>"):].split("</think>")

    stream = shared_model.chat(messages, grammar=THINK_GRAMMAR, max_tokens=60, **GREEDY)
    tokens = list(stream)
    assert "".join(t.text for t in tokens if t.reasoning) == expected_reasoning.strip()
    assert "".join(t.text for t in tokens if not t.reasoning) == expected_answer.strip()
    assert stream.reasoning_text() == expected_reasoning.strip()
    assert all(t.id is not None for t in tokens if t.text == "")  # tags keep their ids
    assert stream.metrics.generated_tokens == len([t for t in tokens if t.id is not None])


@pytest.mark.integration
def test_text_is_the_answer_and_reasoning_text_the_rest_in_any_order(shared_model):
    messages = [{"role": "user", "content": "Hi"}]
    first = shared_model.chat(messages, grammar=THINK_GRAMMAR, max_tokens=60, **GREEDY)
    answer, reasoning = first.text(), first.reasoning_text()
    second = shared_model.chat(messages, grammar=THINK_GRAMMAR, max_tokens=60, **GREEDY)
    assert (second.reasoning_text(), second.text()) == (reasoning, answer)
    assert reasoning and answer and "<" not in reasoning + answer


@pytest.mark.integration
def test_generate_never_splits(shared_model):
    stream = shared_model.generate("Say:", grammar=THINK_GRAMMAR, max_tokens=60, **GREEDY)
    assert stream.text().startswith("<think>")
    assert stream.reasoning_text() == ""


@pytest.mark.integration
def test_a_reply_without_a_block_is_untouched(shared_model):
    messages = [{"role": "user", "content": "Count: one, two,"}]
    plain = shared_model.chat(messages, max_tokens=8, reasoning=False, **GREEDY).text()
    stream = shared_model.chat(messages, max_tokens=8, **GREEDY)
    assert stream.text() == plain and stream.reasoning_text() == ""


def test_a_bad_reasoning_flag_is_refused_before_any_call():
    model = llamarocm.Model.__new__(llamarocm.Model)  # no server: nothing may be called
    with pytest.raises(TypeError, match="reasoning must be"):
        model.chat([{"role": "user", "content": "Hi"}], reasoning="auto")
