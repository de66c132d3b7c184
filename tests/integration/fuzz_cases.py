"""The schema-driven fuzz's client (``test_fuzz``): schemathesis's cases, made cheap, sent to a
running gateway. A module of its own, with nothing of the stack imported, as the test runs it in a
process of its own: in a thread beside the in-process stack, hypothesis's generation held the GIL
from the services' event loop (a 50 ms sleep there came back up to 0.76 s late, p99 0.6 s; with
the fuzz in its own process, 0.02 s at most), long enough to hold a worker's heartbeat up."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

# Per operation and mode: 20 reach every operation in both modes (35, the suite's slowest test,
# took 1.6 times as long). DLORA_FUZZ_EXAMPLES=300 DLORA_FUZZ_RANDOM=1 hunts longer (about a
# minute) on new inputs each run; the suite's run is the same every time.
MAX_EXAMPLES = int(os.environ.get("DLORA_FUZZ_EXAMPLES", "20"))
# The most work one accepted request may ask of the workers here: a fuzzer that asks for 128
# choices of 500 tokens each would spend minutes on a CPU generating them, and test nothing more.
MAX_TOKENS, MAX_CHOICES = 4, 2
# What a generated "model" becomes: the base model, two adapters, and one that does not exist.
SERVED = ("model", "lora-0", "lora-3", "no-such-adapter")
ROLES = ("system", "user", "assistant", "tool", "developer", "robot")


def _cheap(case: schemathesis.Case) -> None:
    """Steer a generated body past the model lookup (a random name is a 404 before anything else
    is read) and clamp the amount of work it asks for, where the value would be accepted:
    out-of-range values (negative, too large, wrong type) stay as generated, for the gateway to
    refuse. A chat request with no limit would fill the context, so it gets one."""
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):  # mostly a served model, or the rest of the body is never read
        body["model"] = SERVED[len(body["model"]) % len(SERVED)]
    for message in body.get("messages") or [] if isinstance(body.get("messages"), list) else []:
        if isinstance(message, dict) and isinstance(message.get("role"), str):  # likewise a known role
            message["role"] = ROLES[len(message["role"]) % len(ROLES)]
    caps = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS, "max_output_tokens": MAX_TOKENS}
    for key, cap in (caps | {"n": MAX_CHOICES}).items():
        value = body.get(key)
        if type(value) is int and cap < value <= 4096:
            body[key] = cap
    if "best_of" in body and type(body["best_of"]) is int and body["best_of"] > MAX_CHOICES:
        body["best_of"] = body.get("n", 1)
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    if "input" in body and body.get("max_output_tokens") is None:  # (the Responses API's)
        body["max_output_tokens"] = MAX_TOKENS
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt):
        body["prompt"] = prompt[:MAX_CHOICES]  # a list of prompts: one choice each


def fuzz(url: str, key: str, admin_key: str) -> tuple[dict[tuple[str, GenerationMode], int], list[str]]:
    """Every operation of the document, valid then invalid bodies, each with the credential its
    operation needs (``admin_key`` for the admin ones, the API ``key`` for the rest): how many
    requests each (operation, mode) got an answer to, and each request answered with a 5xx (or
    not at all). An operation with no input has no invalid form, so no negative entry."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    answered: dict[tuple[str, GenerationMode], int] = {}
    failures: list[str] = []
    admin = {"Authorization": f"Bearer {admin_key}"}  # past the key check, into the admin handlers
    user = {"Authorization": f"Bearer {key}"}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=not os.environ.get("DLORA_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                _cheap(case)
                headers = admin if case.path.startswith(("/v1/adapters", "/v1/keys")) else user
                try:
                    response = case.call(base_url=url, headers=headers, timeout=60)
                except Exception as e:  # noqa: BLE001 - no answer at all is a failure to report too
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r:.300}: {e!r}")
                    return
                answered[operation.label, mode] = answered.get((operation.label, mode), 0) + 1
                if response.status_code >= 500:
                    failures.append(
                        f"{response.status_code} {case.method} {case.formatted_path} "
                        f"{case.body!r:.300} -> {response.text[:300]}"
                    )

            try:
                run()
            except Unsatisfiable:  # an operation with no input (GET /livez) has no invalid form
                assert mode is GenerationMode.NEGATIVE, operation.label
    return answered, failures
