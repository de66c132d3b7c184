"""What refuses a request at a worker's door names the field at fault (``param``): an application
over NATS read null where the gateway names it (a trial: an empty prompt, ids past the vocabulary)."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.admission import check_tokens
from dlora.services.worker.engine.outputs import RequestError


@pytest.mark.parametrize(
    "ids,resumed,params,field,param,says",
    [
        ([], [], SamplingParams(), "prompt_token_ids", "prompt_token_ids", "empty"),
        ([], [], SamplingParams(), "prompt", "prompt", "empty"),
        ([5, 1_000_000_000], [], SamplingParams(), "prompt_token_ids", "prompt_token_ids", "must be in [0, 512)"),
        ([-1], [], SamplingParams(), "prompt_token_ids", "prompt_token_ids", "must be in [0, 512)"),
        ([5] * 64, [], SamplingParams(), "prompt", "prompt", "context holds 64"),
        ([5] * 60, [6] * 5, SamplingParams(), "prompt", "prompt", "context holds 64"),
        ([5], [6, 7, 8], SamplingParams(max_tokens=2), "prompt", "max_tokens", "more than max_tokens=2"),
        ([5], [], SamplingParams(stop_token_ids=[600]), "prompt", "stop_token_ids", "outside the vocabulary"),
        ([5], [], SamplingParams(logit_bias={900: 1.0}), "prompt", "logit_bias", "outside the vocabulary"),
    ],
)
def test_a_refused_prompt_names_its_field(
    ids: list[int], resumed: list[int], params: SamplingParams, field: str, param: str, says: str
) -> None:
    with pytest.raises(RequestError) as e:
        check_tokens(ids, resumed, vocab=512, max_model_len=64, params=params, field=field)
    assert e.value.param == param and says in str(e.value)


def test_a_prompt_that_fits_passes() -> None:
    check_tokens([5, 511], [7], vocab=512, max_model_len=64, params=SamplingParams(max_tokens=4))


def test_a_resume_exactly_at_its_bounds_passes() -> None:
    """Output that reached max_tokens or the context exactly is a request's whole output, its end
    not recorded: it is let in to end "length" (``outputs.ended_on_resume``), as one ending in a
    stop token ends "stop"; a prompt alone that fills the context is refused (no room for a token)."""
    check_tokens([5], [6, 7], vocab=512, max_model_len=64, params=SamplingParams(max_tokens=2))
    check_tokens([5] * 60, [6] * 4, vocab=512, max_model_len=64, params=SamplingParams(max_tokens=100))


def test_a_service_request_whose_prompt_and_max_tokens_overrun_the_context_names_max_tokens() -> None:
    """A text prompt reaches the worker uncounted (the dispatcher cannot tokenize it): without this
    it ran to the context and ended "length" with fewer tokens than max_tokens."""
    with pytest.raises(RequestError) as e:
        check_tokens([5] * 10, [], vocab=512, max_model_len=64, params=SamplingParams(max_tokens=55), whole=True)
    assert e.value.param == "max_tokens" and "needs 65 tokens" in str(e.value)
    check_tokens([5] * 10, [], vocab=512, max_model_len=64, params=SamplingParams(max_tokens=54), whole=True)
    # the engine's own callers (offline generation) still end such a request "length", as vLLM's LLM does
    check_tokens([5] * 10, [], vocab=512, max_model_len=64, params=SamplingParams(max_tokens=55))
