"""What the dispatcher clears of an application's request: the workers' own fields (``tenancy.as_taken``). Pure."""

from __future__ import annotations

from dlora.common.messages import GenerateRequest
from dlora.services.dispatcher.tenancy import as_taken


def test_an_applications_wait_from_a_move_it_never_had_is_cleared() -> None:
    # only a worker that moved the request sets it: sent by an application, its first chunk's
    # queue_seconds said the wait the application named
    sent = GenerateRequest(request_id="r", reply_to="dlora.reply.app.r", prompt_token_ids=[5], queued_s=3600.0)
    assert as_taken(sent, "app").queued_s == 0.0
