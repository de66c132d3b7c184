"""The one table of sampling ranges through the real services: the gateway's 400 and an
application's request over NATS (dispatcher, worker) refuse a value outside it with the reason
``dlora loadgen`` gives for it, word for word (``tests/unit/test_sampling_ranges.py``: each surface
alone)."""

from __future__ import annotations

import pytest

from dlora.common.messages import ErrorCode, SamplingParams
from dlora.services.cli import build_parser
from tests.integration.conftest import Stack
from tests.integration.test_gateway import post
from tests.integration.test_structured_schemas import app_generate


async def test_the_gateway_and_the_bus_refuse_an_out_of_range_value_as_loadgen_does(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("temperature", 2.5), ("top_k", -2)):
        option = f"--{name.replace('_', '-')}"
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", option, str(value)])
        said = capsys.readouterr().err.strip().splitlines()[-1].split(f"argument {option}: ", 1)[1]
        status, answer = await post(stack, "/v1/completions", {"model": "lora-0", "prompt": "kalo", name: value})
        assert (status, answer["error"]["message"], answer["error"]["param"]) == (400, said, name)
        last = (await app_generate(stack, SamplingParams(max_tokens=2, **{name: value})))[-1]
        assert (last.error_code, last.error, last.param) == (ErrorCode.BAD_REQUEST, said, name)
