"""``llamarocm chat``: the REPL, and with ``--tools`` each turn run as a tool loop."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO

import llamarocm

from .console import print_stderr
from .options import check_generation_options, generation_options, load


def check_chat_options(args: argparse.Namespace) -> None:
    """The generation options, and those that only make sense with ``--tools``."""
    check_generation_options(args)
    if args.parallel_tool_calls and not args.tools:
        raise ValueError("--parallel-tool-calls needs --tools")


def cmd_chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    options = generation_options(args)
    if args.parallel_tool_calls:
        options["parallel_tool_calls"] = True
    with load(args) as model:
        if interactive:
            print_stderr("Type a message; /reset clears the history, /exit or Ctrl-D quits, Ctrl-C stops a reply.")
        chat_loop(
            model,
            lambda: input("> " if interactive else ""),
            sys.stdout,
            system=args.system,
            tools=[function for functions in args.tools or () for function in functions],
            **options,
        )
    return 0


def chat_loop(
    model: "llamarocm.Model",
    read_line: Callable[[], str],
    out: TextIO,
    *,
    system: Optional[str] = None,
    tools: Sequence[Callable[..., Any]] = (),
    **options: Any,
) -> List[Dict[str, Any]]:
    """The REPL: read a line, stream the reply, keep the history; return the history.

    ``/reset`` clears the history (keeping the system message), ``/exit`` or end of
    input quits, Ctrl-C during a reply stops that reply only. With ``tools``, each
    reply is :meth:`~llamarocm.Model.act`'s: the calls are shown as they were run,
    then the answer.
    """
    history: List[Dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    kept = len(history)
    while True:
        try:
            text = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            return history
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            del history[kept:]
            continue
        history.append({"role": "user", "content": text})
        if tools:
            history[:] = _act_reply(model, history, tools, out, options)
            continue
        reply = []
        stream = model.chat(history, **options)
        try:
            for token in stream:
                reply.append(token.text)
                out.write(token.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        finally:
            stream.close()
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def _act_reply(
    model: "llamarocm.Model", history: List[Dict[str, Any]], tools: Sequence[Callable[..., Any]], out: TextIO,
    options: Dict[str, Any],
) -> List[Dict[str, Any]]:
    """One turn of the REPL with tools: the history after it (the user's line dropped
    if Ctrl-C stopped the turn)."""
    try:
        result = model.act(history, tools, **options)
    except KeyboardInterrupt:
        out.write(" [stopped]\n")
        out.flush()
        return history[:-1]
    for message in result.messages[len(history):]:
        if message["role"] == "tool":
            out.write(f"[{message.get('name')} -> {message['content']}]\n")
        for call in message.get("tool_calls") or ():
            out.write(f"[call {call['function']['name']}({call['function']['arguments']})]\n")
    if result.finish_reason == "tool_calls":
        out.write(f"[stopped after {result.rounds} rounds with calls pending]\n")
    out.write(result.text + (" [cut short]" if result.finish_reason == "length" else "") + "\n")
    out.flush()
    return result.messages
