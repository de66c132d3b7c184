"""What every tool-call parser shares (``tool_parsers``, ``tool_granite``, ``tool_pythonic``): a
call as read, a decoded object read as one, the readings of an output's pieces joined, a tag's
start at a text's end (``partial_tag``, the reasoning parser's too). Pure."""

from __future__ import annotations

from dlora.services.gateway.tool_json import arguments_json, loads

Call = tuple[int, str, str]  # (its place among the choice's calls, function name, arguments as JSON text)


def decoded_call(obj: object, arguments_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a decoded call (its arguments under the first of ``arguments_keys``
    it holds), or None where it is not one."""
    if not isinstance(obj, dict) or not isinstance(name := obj.get("name"), str):
        return None
    args: object = next((obj[k] for k in arguments_keys if k in obj), {})
    if args is None or isinstance(args, str) and not args.strip():  # a parameterless tool's, as some models write it
        args = {}
    if isinstance(args, str):  # already JSON text (Granite 4 writes its arguments so): not encoded again
        try:
            args = decoded if isinstance(decoded := loads(args), dict) else args
        except ValueError:
            pass
    # Arguments that are no object are the call's all the same, encoded as JSON: vLLM's and SGLang's
    # parsers json.dumps whatever a call holds, and a client's agent loop can answer a call whose
    # arguments do not fit (given out as text, the call's markup reached the user instead)
    return name, arguments_json(args)


def joined(*parts: tuple[str, list[Call]]) -> tuple[str, list[Call]]:
    """Readings of one output's pieces, in order, as one: the content joined, the calls listed."""
    return "".join(text for text, _ in parts), [call for _, calls in parts for call in calls]


def partial_tag(text: str, tag: str, start: int = 0) -> int:
    """How many characters at the end of ``text`` (from ``start``) could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
