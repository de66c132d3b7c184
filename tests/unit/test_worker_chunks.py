"""The worker's answers for requests it cannot run."""

from __future__ import annotations

from dlora.common.messages import ErrorCode, FinishReason, GenerateRequest, SamplingParams
from dlora.services.worker.chunks import adapter_failure_chunk


def test_an_adapter_that_cannot_be_loaded_is_the_servers_fault_and_its_paths_stay_in_the_log() -> None:
    """A user's trial: a truncated adapter file answered a tenant's valid request with a 400
    naming the server's directory. A 500, the reason kept, the paths left out."""
    req = GenerateRequest(
        request_id="r", reply_to="_INBOX.r", prompt_token_ids=[1], params=SamplingParams(), adapter="sec2"
    )
    errors = [
        "adapter 'sec2@25e1': cannot read /srv/adapters/x5/adapter_model.safetensors (data_offsets 1/2 past the end)",
        "adapter 'sec2': the files in /srv/adapters/x7 changed since version 3f was registered",
        "/srv/adapters/x5/adapter_config.json,is not a JSON object",
    ]
    for error in errors:
        chunk = adapter_failure_chunk(req, error, "worker-0")
        assert chunk.error_code is ErrorCode.INTERNAL and chunk.error is not None
        assert "/srv" not in chunk.error and "<path>" in chunk.error, chunk.error
        assert chunk.error.startswith("adapter 'sec2' could not be loaded on worker worker-0: ")
    assert "1/2 past the end" in adapter_failure_chunk(req, errors[0], "w").error  # not a path
    # The adapter's own rank past this worker's max_lora_rank (no other took it): the request's
    # adapter against the serving limit, a 400 naming it (it was a 500)
    over = "adapter 'sec2': layer 0 q_proj: rank 64 is above max_lora_rank=16"
    chunk = adapter_failure_chunk(req, over, "worker-0", over_limit=True)
    assert chunk.error_code is ErrorCode.BAD_REQUEST and chunk.param == "model"  # (OpenAI's: the field at fault)
    assert chunk.error is not None and "rank 64 is above max_lora_rank=16" in chunk.error
    assert adapter_failure_chunk(req, errors[0], "w").param is None  # the server's fault: no field of the body


def test_the_first_chunk_of_a_first_run_says_its_prefix_cache_hit() -> None:
    """A moved or recovered request's usage said the recompute's hit; a reader keeps this one."""
    import msgspec

    from dlora.services.worker.chunks import chunk_for, open_stream
    from dlora.services.worker.engine import RequestOutput

    req = GenerateRequest(request_id="r", reply_to="_INBOX.r", prompt_token_ids=[1] * 40, params=SamplingParams())
    out = RequestOutput("r", [5], "x", False, None, num_prompt_tokens=40, num_output_tokens=1, num_cached_tokens=32)
    fresh = open_stream(req, 0.0)
    assert chunk_for(out, fresh, "w", 0.0).prompt_cached_tokens == 32
    assert chunk_for(out, fresh, "w", 0.0).prompt_cached_tokens is None  # the first chunk only
    moved = open_stream(msgspec.structs.replace(req, continued=True), 0.0)
    assert chunk_for(out, moved, "w", 0.0).prompt_cached_tokens is None  # its prompt was prefilled before


def test_an_output_that_did_not_fail_claims_no_error_code_and_an_uncoded_failure_is_the_servers() -> None:
    """RequestOutput.error_code defaulted to INTERNAL: every output that had not failed said it was
    the server's fault to whoever read the field."""
    from dlora.services.worker.chunks import chunk_for, open_stream
    from dlora.services.worker.engine import RequestOutput

    req = GenerateRequest(request_id="r", reply_to="_INBOX.r", prompt_token_ids=[1], params=SamplingParams())
    fine = RequestOutput("r", [5], "x", True, FinishReason.STOP, num_prompt_tokens=1, num_output_tokens=1)
    assert fine.error_code is None and chunk_for(fine, open_stream(req, 0.0), "w", 0.0).error_code is None
    failed = RequestOutput("r", [], "", True, FinishReason.ERROR, 1, 0, error="out of blocks")
    chunk = chunk_for(failed, open_stream(req, 0.0), "w", 0.0)
    assert chunk.error_code is ErrorCode.INTERNAL and chunk.error == "the request failed on worker w: out of blocks"
