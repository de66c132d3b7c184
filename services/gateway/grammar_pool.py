"""A request's structured output compiled before it is shaped, on threads of its own.

Shaping runs on one thread (the tokenizer sees one caller), and it compiled the structured output
too: a schema llguidance takes long over (400 patternProperties, 20 KB: 12 s here; 1,000: hours)
held every other request's shaping, plain ones too, for all of it. Compiled first on threads of
the served model's ``Grammars`` (``off_loop``; ``shaping.GATEWAY_COMPILES`` of them), it holds
only requests waiting on the same threads (as vLLM compiles grammars beside its scheduler, not in
front of it); shaping then finds it compiled (``Grammars`` keeps it).
"""

from __future__ import annotations

from dlora.services.gateway.openai import Body
from dlora.services.gateway.sampling import structured, structured_field
from dlora.services.worker.engine.structured import Grammars


def _compile(body: Body, grammars: Grammars) -> None:
    if structured_field(body) is not None:
        structured(body, grammars)


async def compiled_first(body: Body, grammars: Grammars | None) -> None:
    """Compile the structured output ``body`` asks for, if any, with ``grammars`` (the served
    model's; None: checked in shaping alone).

    Raises:
        APIError(400): the one shaping would raise for it (naming the field).
    """
    if grammars is not None:
        await grammars.off_loop(_compile, body, grammars)
