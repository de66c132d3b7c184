"""Which of a group's requests the ILP's count of them moving to a worker names. Pure."""

from __future__ import annotations

from dlora.services.migrator.snapshot import RequestState


def within(
    requests: list[RequestState], count: int, blocks: int, block_size: int
) -> tuple[list[RequestState], list[RequestState]]:
    """Up to ``count`` of ``requests`` (in the order they are best moved) whose contexts fill at most
    ``blocks`` of ``block_size`` tokens, and the rest. The ILP counts a group's requests at their
    mean blocks, and the first ``count`` could hold more: a long context with a long answer to go is
    the cheapest to move per second of work, and a plan sent it to a worker half its size (a
    helper's probe). One that does not fit is passed over for a later, shorter one."""
    named: list[RequestState] = []
    rest: list[RequestState] = []
    for r in requests:
        need = -(-r.context_tokens // block_size)
        if len(named) < count and need <= blocks:
            named.append(r)
            blocks -= need
        else:
            rest.append(r)
    return named, rest
