"""Reasoning apart from the answer: a reply that opens with ``<think>...</think>``.

Reasoning models (DeepSeek-R1, Qwen3, ...) write their thoughts in a ``<think>`` block
before the answer; llama-server's OpenAI endpoint hands them over as
``reasoning_content``, and so does OpenAI's API. :class:`ReasoningSplitter` does the same
for text that arrives in pieces: fed each token's text in turn, it says which part is
reasoning and which is answer, drops the tags, and holds back text that may be the
start of a tag (``</th`` ...) until the next piece decides. Pure text in, text out.

Whitespace right after a tag (``<think>\\n``, ``</think>\\n\\n``) and right before the
closing tag is dropped, as llama-server trims ``reasoning_content`` and ``content``.
"""

from __future__ import annotations

from typing import List, Tuple

__all__ = ["ReasoningSplitter", "OPEN_TAG", "CLOSE_TAG", "opens_reasoning", "splitter_for", "check_reasoning"]

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

Piece = Tuple[str, bool]  # (text, is_reasoning)

# States. START: the reply's first characters decide whether a block opens.
# REASONING_START: the block is open, an opening tag may still come. *_LEAD: whitespace
# after a tag, dropped.
_START, _REASONING_START, _REASONING_LEAD, _REASONING, _ANSWER_LEAD, _ANSWER = range(6)


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered chat prompt ends inside an open ``<think>`` block: templates
    of some reasoning models (Qwen3 with thinking on, DeepSeek-R1) put the opening tag
    in the prompt, so the reply starts with reasoning and has only the closing tag.

    >>> opens_reasoning("<|im_start|>assistant\\n<think>\\n")
    True
    >>> opens_reasoning("<think>\\n\\n</think>\\n\\n")
    False
    """
    tail = prompt.rstrip()
    return tail.endswith(OPEN_TAG)


class ReasoningSplitter:
    """Split a reply into reasoning and answer, fed piece by piece.

    ``starts_in_reasoning=False`` (a normal reply): a ``<think>`` block is reasoning only
    when the reply opens with it (leading whitespace aside); any other reply is all
    answer, ``<think>`` in its middle included. ``True`` (the prompt opened the block):
    the reply is reasoning until ``</think>``, and an opening tag at its very start is
    dropped. A reply that never closes its block is all reasoning, as a reply cut short
    by ``max_tokens`` is.

    :meth:`feed` returns ``(text, is_reasoning)`` pieces, neighbours of one kind joined;
    :meth:`finish` returns what was held back.

    >>> splitter = ReasoningSplitter()
    >>> splitter.feed("<think>\\nhm, 2+2</th")
    [('hm, 2+2', True)]
    >>> splitter.feed("ink>\\n\\n4")
    [('4', False)]
    """

    def __init__(self, starts_in_reasoning: bool = False) -> None:
        self._state = _REASONING_START if starts_in_reasoning else _START
        self._held = ""  # text not yet decided: a possible tag, or trailing whitespace
        #: Whether the last :meth:`feed` saw reasoning or a tag (for a piece of text
        #: that yields nothing, such as the tag itself).
        self.touched_reasoning = starts_in_reasoning

    @property
    def passes_through(self) -> bool:
        """Whether the rest of the reply is answer, unchanged: text fed from now on
        comes back as it is (so a caller may skip feeding it)."""
        return self._state == _ANSWER and not self._held

    @property
    def in_reasoning(self) -> bool:
        """Whether text fed now would be reasoning."""
        return self._state in (_REASONING_START, _REASONING_LEAD, _REASONING)

    def feed(self, text: str) -> List[Piece]:
        """The pieces ``text`` completes, in order."""
        out: List[Piece] = []
        self.touched_reasoning = self.in_reasoning
        self._held += text
        while self._held:
            before = (self._state, self._held)
            self._step(out)
            if (self._state, self._held) == before:
                break  # waiting for more text
        return out

    def finish(self) -> List[Piece]:
        """What was held back, once the reply has ended."""
        held, self._held = self._held, ""
        if self._state in (_START, _ANSWER_LEAD, _ANSWER):
            text = held.strip() if self._state == _ANSWER_LEAD else held
            return [(text, False)] if text else []
        text = held.rstrip() if self._state == _REASONING else held.strip()
        return [(text, True)] if text else []

    def _step(self, out: List[Piece]) -> None:
        if self._state in (_START, _REASONING_START):
            self._step_start(out)
        elif self._state == _REASONING:
            self._step_reasoning(out)
        elif self._state in (_REASONING_LEAD, _ANSWER_LEAD):
            self._held = self._held.lstrip()
            if self._held:
                self._state = _REASONING if self._state == _REASONING_LEAD else _ANSWER
        else:
            _emit(out, self._held, False)
            self._held = ""

    def _step_start(self, out: List[Piece]) -> None:
        """At the reply's start: an opening tag (after whitespace), or not."""
        stripped = self._held.lstrip()
        if stripped.startswith(OPEN_TAG):
            self._held = stripped[len(OPEN_TAG):]
            self._state = _REASONING_LEAD
            self.touched_reasoning = True
        elif not stripped or OPEN_TAG.startswith(stripped):
            return  # only whitespace, or part of the tag: wait
        elif self._state == _START:
            self._state = _ANSWER
        else:
            self._held = stripped
            self._state = _REASONING

    def _step_reasoning(self, out: List[Piece]) -> None:
        """Inside the block: emit up to the closing tag, hold what may start it."""
        self.touched_reasoning = True
        end = self._held.find(CLOSE_TAG)
        if end >= 0:
            _emit(out, self._held[:end].rstrip(), True)
            self._held = self._held[end + len(CLOSE_TAG):]
            self._state = _ANSWER_LEAD
            return
        keep = _partial_tag_length(self._held, CLOSE_TAG)
        # Whitespace before a possible closing tag waits too: it is dropped if the tag
        # comes. What stays held is whitespace and the start of a tag, or nothing.
        text = self._held[: len(self._held) - keep].rstrip()
        _emit(out, text, True)
        self._held = self._held[len(text):]


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a start of ``tag``."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _emit(out: List[Piece], text: str, reasoning: bool) -> None:
    if not text:
        return
    if out and out[-1][1] == reasoning:
        out[-1] = (out[-1][0] + text, reasoning)
    else:
        out.append((text, reasoning))


def splitter_for(reasoning: object, prompt: str) -> "ReasoningSplitter | None":
    """The splitter for a chat reply to ``prompt``, by ``chat(reasoning=...)``:
    ``None`` (auto) splits a reply that opens a ``<think>`` block or whose prompt
    opened one; ``True`` takes the reply as reasoning until ``</think>`` in any case;
    ``False`` never splits (the text stays as the model wrote it, tags and all).
    """
    check_reasoning(reasoning)
    if reasoning is False:
        return None
    return ReasoningSplitter(starts_in_reasoning=bool(reasoning) or opens_reasoning(prompt))


def check_reasoning(reasoning: object) -> None:
    """Refuse a ``reasoning=`` that is not ``True``, ``False`` or ``None``."""
    if reasoning is not None and not isinstance(reasoning, bool):
        raise TypeError(f"reasoning must be True, False or None (auto), not {type(reasoning).__name__}")
