"""A request shaped, then its structured output compiled, on threads of its own.

Shaping runs on one thread (the tokenizer sees one caller), and it compiled the structured output
too: a schema llguidance takes long over (400 patternProperties, 20 KB: 12 s here; 1,000: hours)
held every other request's shaping, plain ones too, for all of it. Compiled on threads of the
served model's ``Grammars`` (``off_loop``; ``shaping.GATEWAY_COMPILES`` of them), it holds only
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

from dlora.services.gateway.openai import Body
from dlora.services.gateway.sampling import structured, structured_field
from dlora.services.gateway.shaping import Job
from dlora.services.worker.engine.structured import Grammars


def _compile(body: Body, grammars: Grammars) -> None:
    if structured_field(body) is not None:
        structured(body, grammars)


async def shaped(body: Body, shape: Callable[..., Job], shaping: Executor, grammars: Grammars | None) -> Job:
    """``shape`` (``shaping.shape_request`` of ``body``, all but ``compile_grammar``) on the
    ``shaping`` thread, then the structured output ``body`` asks for compiled with ``grammars``
    (the served model's; None: checked in shaping alone).

    Raises:
        APIError: shaping's refusal, or the structured output's (400, naming the field).
    """
    job = await asyncio.get_running_loop().run_in_executor(
        shaping, functools.partial(shape, compile_grammar=grammars is None)
    )
    if grammars is not None:
        await grammars.off_loop(_compile, body, grammars)
    return job
