"""Other servers' public bug reports about tool-call parsing, replayed against dlora's parsers: each
report's model output read whole, token by token (a character at a time, as the smallest pieces
the gateway feeds) and in random pieces (a batched detokenizer's, speculative decoding's), all
answering the same content and calls. The reports' numbers name where the input came from."""

from __future__ import annotations

import json

import pytest

from dlora.services.gateway.tool_calls import CallStream
from tests.unit.tool_cases import read_decoded, splits


def _hermes(*calls: dict[str, object]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps(c, ensure_ascii=False) + "\n</tool_call>" for c in calls)


TWO = _hermes({"name": "get_weather", "arguments": {"city": "SF"}}, {"name": "get_time", "arguments": {"tz": "PST"}})
TWO_CALLS = [("get_weather", {"city": "SF"}), ("get_time", {"tz": "PST"})]
PREDICT = {"wd": 23, "sd": 0.8, "injection": "ZSJB39", "module_id": "M62121G9142"}
VOICE = {"AudioPath": "https://example.com/real_audio.mp3", "language": "zh", "function_one_name_called": True}

REPORTS = [
    # vLLM #28806, #11392, #21301 (SGLang #35564's step3 alike): a parameterless call streamed no "{}"
    ("hermes", _hermes({"name": "current_time", "arguments": {}}), "", [("current_time", {})]),
    ("hermes", '<tool_call>\n{"name": "sql_db_list_tables"}\n</tool_call>', "", [("sql_db_list_tables", {})]),
    # pydantic-ai #1802: arguments null or "" for a parameterless tool
    (
        "hermes",
        '<tool_call>{"name": "a", "arguments": null}</tool_call><tool_call>{"name": "b", "arguments": ""}</tool_call>',
        "",
        [("a", {}), ("b", {})],
    ),
    # SGLang #31915, #18001/#18127, #20004: two parallel calls in coarse chunks lost the second
    ("hermes", TWO, "", TWO_CALLS),
    ("hermes", "Sure. " + TWO, "Sure. ", TWO_CALLS),  # vLLM #48020: a call's start and end in one delta
    # vLLM #45167 (PRs #45310, #48353): an argument quoting the closing tag
    (
        "hermes",
        _hermes({"name": "w", "arguments": {"t": "end with </tool_call> ok"}}),
        "",
        [("w", {"t": "end with </tool_call> ok"})],
    ),
    # vLLM #9365, #17704: non-ASCII arguments escaped
    (
        "hermes",
        _hermes({"name": "s", "arguments": {"q": "北京天气 Umeå"}}),
        "",
        [("s", {"q": "北京天气 Umeå"})],
    ),
    # vLLM #56263: text after a call, whole and streamed alike
    (
        "hermes",
        "Let me check. " + _hermes({"name": "f", "arguments": {}}) + " Done!",
        "Let me check. ",
        [("f", {})],
    ),
    # SGLang #34677: a call of a tool not offered beside a good one (both passed on, as vLLM's)
    (
        "hermes",
        _hermes({"name": "nope", "arguments": {}}, {"name": "f", "arguments": {"a": 1}}),
        "",
        [("nope", {}), ("f", {"a": 1})],
    ),
    ("hermes", _hermes({"name": "predict_x", "arguments": PREDICT}), "", [("predict_x", PREDICT)]),  # vLLM #10395
    # SGLang #35564 (PR #36692): only the first call of a Mistral array was read
    (
        "mistral",
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
        "",
        [("a", {"x": 1}), ("b", {})],
    ),
    # Rapid-MLX #579 (vllm-mlx #631): v11's [ARGS] split from the name and the object
    (
        "mistral",
        '[TOOL_CALLS]read[ARGS]{"file_path": "/tmp/foo.txt"}[TOOL_CALLS]ls[ARGS]{}',
        "",
        [("read", {"file_path": "/tmp/foo.txt"}), ("ls", {})],
    ),
    ("mistral", '[TOOL_CALLS]read[CALL_ID]a1b2c3d4e[ARGS]{"p": 1}', "", [("read", {"p": 1})]),
    # SGLang #24899: "]" inside a string cut a pythonic call
    ("pythonic", '[search(query="hello]world"), ping()]', "", [("search", {"query": "hello]world"}), ("ping", {})]),
    # SGLang #27910, vLLM #15462: negative numbers dropped every call of the list
    (
        "pythonic",
        "[set_temperature(value=-5), goto(longitude=-74.0046539)]",
        "",
        [("set_temperature", {"value": -5}), ("goto", {"longitude": -74.0046539})],
    ),
    # vLLM #48171 (lfm2's cases): a bracket and a backslash at a string's end, a tuple, a reserved
    # word as a parameter, a line break in a string, space after the tag
    (
        "pythonic",
        """[run(command='grep -F "]" log.txt', p='x \\\\', size=(800, 600))]""",
        "",
        [("run", {"command": 'grep -F "]" log.txt', "p": "x \\", "size": [800, 600]})],
    ),
    (
        "pythonic",
        "<|python_start|> [memory_get(from=1), write(c='a\nb')]",
        "",
        [("memory_get", {"from": 1}), ("write", {"c": "a\nb"})],
    ),
    # mlx-lm #1785 (PR #1796): a single-quoted argument cut at its first comma
    (
        "pythonic",
        """[write(filePath='/tmp/hello.py', content='# Hello\\nprint("Hello, World!")')]""",
        "",
        [("write", {"filePath": "/tmp/hello.py", "content": '# Hello\nprint("Hello, World!")'})],
    ),
    # vLLM PR #46708: a string ending in an escaped backslash ("a\\") read as left open
    ("pythonic", '[f(p="a\\\\", q=1)]', "", [("f", {"p": "a\\", "q": 1})]),
    # vLLM PR #32539: a quote left unescaped (city='O'Brien') is no Python: text, as vLLM's
    ("pythonic", "[get_weather(city='O'Brien')]", "[get_weather(city='O'Brien')]", []),
    # dynamo #9536: Llama's calls separated by ";" after <|python_tag|>
    (
        "llama3_json",
        '<|python_tag|>{"name":"get_weather","arguments":{"location":"NYC"}};{"name":"get_time","arguments":{}}',
        "",
        [("get_weather", {"location": "NYC"}), ("get_time", {})],
    ),
    # vLLM #51577: llama3_json streamed in pieces of many tokens disagreed with the whole reading
    (
        "llama3_json",
        '{"name": "a", "parameters": {"q": "x; {y}"}}; {"name": "b", "parameters": {"n": [1, {"m": 2}]}}',
        "",
        [("a", {"q": "x; {y}"}), ("b", {"n": [1, {"m": 2}]})],
    ),
    # vLLM #46863: Llama 4 writing JSON calls to a pythonic server: text, as vLLM gives it
    (
        "pythonic",
        '{"name": "Bash", "parameters": {"command": "echo"}}',
        '{"name": "Bash", "parameters": {"command": "echo"}}',
        [],
    ),
    # vLLM PR #19024 (and #26047, ollama #17323): prose after a call (and a key beside the call's);
    # the text after it is the model's as written, its line breaks too
    (
        "llama3_json",
        '{"type": "function", "name": "getOpenIncidentsTool", "parameters": {}} \n\nWould you like more?',
        " \n\nWould you like more?",
        [("getOpenIncidentsTool", {})],
    ),
    (
        "llama3_json",
        '{"name": "get_temperature", "arguments": {"city": "Tokyo"}} I called the tool for you.',
        " I called the tool for you.",
        [("get_temperature", {"city": "Tokyo"})],
    ),
    # Rapid-MLX #700 (PR #703): an object with a name and no arguments is an answer, not a call
    # (vLLM's reading needs them, as Llama's template writes them): it was a call of Alice
    ("llama3_json", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    # vLLM #16214: Llama 4's JSON calls inside <|python_start|> ... <|python_end|> came back as text
    (
        "llama3_json",
        '<|python_start|>{"name": "brave_web_search", "parameters": {"query": "latest news"}}<|python_end|>',
        "",
        [("brave_web_search", {"query": "latest news"})],
    ),
    (
        "llama3_json",
        '{"name": "add", "parameters": {"a": "3", "b": "5"}}',
        "",
        [("add", {"a": "3", "b": "5"})],
    ),  # SGLang #4656
    # mlx-lm PR #1448: v11 calls side by side, and prose after one, lost the calls (after a call
    # the text is not content, as vLLM's)
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "Tokyo"}',
        "",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]grep[ARGS]{"pattern": "TODO"}\n\nLet me search for that.',
        "",
        [("grep", {"pattern": "TODO"})],
    ),
    # mlx-lm #1374 (PR #1643): the JSON-array form, an id beside each call
    (
        "mistral",
        '[TOOL_CALLS][{"name": "read_file", "arguments": {"path": "/tmp/t.txt"}, "id": "abcdefghi"}]',
        "",
        [("read_file", {"path": "/tmp/t.txt"})],
    ),
    # vLLM #10589: Qwen2.5's streamed arguments came out cut (a URL, a boolean)
    ("hermes", _hermes({"name": "voice_to_text", "arguments": VOICE}), "", [("voice_to_text", VOICE)]),
    # club-3090 #72 (vLLM #22975): prose quoting the tag silenced the stream; it is text at once
    ("hermes", "Calls are <tool_call> then JSON.", "Calls are <tool_call> then JSON.", []),
    ("granite", '<|tool_call|>[{"name": "now", "arguments": {}}]', "", [("now", {})]),
    # TensorRT-LLM PR #17575's review: a call with no "arguments" key, text after it, never completed
    ("hermes", '<tool_call>\n{"name": "get_time"}\n</tool_call> All done.', "", [("get_time", {})]),
    # vLLM #47901 (xlam's JSON array): the arguments of a call after an empty-argument call were lost streamed
    (
        "granite",
        '<|tool_call|>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 42}}]',
        "",
        [("a", {}), ("b", {"x": 42})],
    ),
    (
        "granite-20b-fc",
        '<function_call> {"name": "a", "arguments": {"x": "}"}} <function_call> {"name": "b", "arguments": {}}',
        "",
        [("a", {"x": "}"}), ("b", {})],
    ),
]


@pytest.mark.parametrize(("kind", "text", "content", "calls"), REPORTS)
def test_a_reported_output_reads_as_its_calls_whole_and_however_streamed(
    kind: str, text: str, content: str, calls: list[tuple[str, object]]
) -> None:
    for pieces in splits(text, len(text)):
        assert read_decoded(kind, pieces) == (content, calls), pieces


def test_a_required_list_of_calls_reads_alike_however_streamed() -> None:
    """vLLM #24509: tool_choice "required" streamed failed where the unstreamed answer worked."""
    text = '[{"name": "get_weather", "parameters": {"city": "SF"}}, {"name": "get_time", "parameters": {}}]'
    for pieces in splits(text, 24509):
        stream, calls = CallStream(), []
        for piece in pieces:
            calls += stream.feed(piece)
        assert [(name, arguments) for _, name, arguments in calls] == [
            ("get_weather", '{"city": "SF"}'),
            ("get_time", "{}"),
        ]
        assert stream.closed
