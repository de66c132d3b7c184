"""A request shaped, then its structured output compiled, on threads of its own.

Shaping runs on one thread (the tokenizer sees one caller), and it compiled the structured output
too: a schema llguidance takes long over (400 patternProperties, 20 KB: 12 s here; 1,000: hours)
held every other request's shaping, plain ones too, for all of it. Compiled on threads of the
served model's ``Grammars`` (``off_loop``; ``served_model.GATEWAY_COMPILES`` of them), it holds only
requests waiting on the same threads (as vLLM compiles grammars beside its scheduler, not in front
of it). It is compiled after shaping's checks, which need no grammar: a request they refuse (a bad
temperature, an unknown model, a prompt past the context) spent a compile before its 400 when the
compile came first.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor

from dlora.services.gateway.openai import APIError, Body
from dlora.services.gateway.sampling import structured, structured_field
from dlora.services.gateway.shaping import Job
from dlora.services.worker.engine.structured import Grammars


def _compile(body: Body, grammars: Grammars) -> None:
    structured(body, grammars)


async def shaped(
    body: Body, shape: Callable[..., Job], shaping: Executor, grammars: Grammars | None, stopped: asyncio.Event
) -> Job:
    """``shape`` (``shaping.shape_request`` of ``body``, all but ``compile_grammar``) on the
    ``shaping`` thread, then the structured output ``body`` asks for compiled with ``grammars``
    (the served model's; None: checked in shaping alone), unless the gateway is ``stopped`` first.

    Raises:
        APIError: shaping's refusal, or the structured output's (400, naming the field).
        APIError(503): the gateway stopped meanwhile. Its stop answers the requests in flight; one
            compiling was not yet, and held the listener's close for its grace, then was cut off
            with no answer (the compile runs on, up to its bound, on a daemon thread).
    """
    job = await asyncio.get_running_loop().run_in_executor(
        shaping, functools.partial(shape, compile_grammar=grammars is None)
    )
    if grammars is None or structured_field(body) is None:
        return job
    compiling = asyncio.ensure_future(grammars.off_loop(_compile, body, grammars))
    stop = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait((compiling, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not compiling.done():
        compiling.cancel()
        raise APIError(503, "the gateway is shutting down; try again")
    compiling.result()
    return job
