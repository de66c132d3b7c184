"""The gateway's settings (``[gateway]`` in ``dlora.toml``); see ``dlora.common.settings`` for how they load."""

from __future__ import annotations

import math
import re

import msgspec

from dlora.common.apikeys import MIN_RATE
from dlora.common.settings import Common, Problems, nested_problems
from dlora.model.adapter_files import AdapterLimits
from dlora.services.gateway.chat_template import CONTENT_FORMATS
from dlora.services.gateway.reasoning import PARSERS as REASONING_PARSERS
from dlora.services.gateway.tool_parsers import PARSERS

# The gateway's ``auth`` modes (see the setting).
AUTH_MODES = ("none", "keys")
# Where requests' sampling defaults come from (see the setting).
GENERATION_CONFIGS = ("auto", "vllm")
# The longest responses_ttl_s: ten years. Redis refuses a PEXPIRE past 2^63 ms at EXEC, after the
# HSET queued with it is done (no rollback): every response stored without a TTL, and refused.
MAX_RESPONSES_TTL_S = 10 * 365 * 86400.0


# An origin as a browser's Origin header spells it (RFC 6454): scheme://host[:port], nothing after.
# Lower case, and with no default port (the URL standard's origin serialization): an origin written
# otherwise, compared as text with the browser's, would match nothing.
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(?:[a-z0-9_.~-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?")
_DEFAULT_PORTS = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}
# A method or header name: an HTTP token (RFC 9110 5.6.2).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The characters no HTTP header value holds: the controls but a tab, and DEL
_NO_HEADER_CHARS = frozenset(map(chr, [*range(0x09), *range(0x0A, 0x20), 0x7F]))


class GatewaySettings(Common, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    # The base model directory (its tokenizer and config check requests; its name is the base "model").
    model: str = ""
    # The name clients use for the base model (vLLM's --served-model-name); empty: the directory's name.
    served_model_name: str = ""
    # vLLM's --generation-config: "auto", the model's generation_config.json gives the defaults of
    # temperature, top_p, top_k, min_p, repetition_penalty and max_tokens (a cap, as vLLM's) to
    # requests that leave them out; "vllm", the API's own defaults.
    generation_config: str = "auto"
    # vLLM's --tool-call-parser (with --enable-auto-tool-choice): how the model writes tool calls
    # in its text, "hermes" (Hermes 2 Pro, Qwen2.5), "llama3_json" (Llama 3.1/3.2), "mistral"
    # (Mistral 7B v0.3, Nemo, Small 3.x: call ids of 9 alphanumeric characters), "pythonic"
    # (Llama 3.2 and Llama 4's [f(x=1), g()] lists: gateway/tool_pythonic.py) or "granite"
    # (Granite 3.0/3.1's <|tool_call|>[{...}]: gateway/tool_granite.py) or "granite-20b-fc"
    # (Granite 20B FunctionCalling's <function_call> {...}); set, a chat's
    # tool_choice "auto" (the default with tools) is served, its calls read from the output
    # (gateway/tool_parsers.py). Empty: "auto" is refused (400).
    tool_call_parser: str = ""
    # vLLM's --reasoning-parser: how the model writes its reasoning, "deepseek_r1" (DeepSeek R1 and
    # its distills), "qwen3" (Qwen3, QwQ, Qwen3.5; chat_template_kwargs enable_thinking false:
    # all content), "deepseek_v3" (DeepSeek V3.1+: read only where chat_template_kwargs say
    # thinking or enable_thinking, else all content) or "granite" (Granite 3.2/3.3: plain-text
    # markers "Here is my thought process:" / "Here is my response:", not tags); set, a chat's
    # <think>...</think> goes out as the message's "reasoning" and the rest as its content, the
    # only text tool calls are read from (gateway/reasoning.py).
    # Set, a structured output's grammar binds only the content: the workers hold it back until the
    # output's </think> (as vLLM does once the reasoning ends). Empty: off, the text as written.
    reasoning_parser: str = ""
    # vLLM's --chat-template-content-format: how a chat message's content reaches the model's
    # template, "string" (text parts joined by newlines), "openai" (a list of parts), or "auto":
    # parts where the template loops over a message's content (its source read once), a tool
    # message's as a string all the same (templates write tool results with |string).
    chat_template_content_format: str = "auto"
    # Bearer key with every right: adapter and API key administration, every adapter, file paths
    # in /v1/models; the credential that makes the first API keys. Empty: none (with auth "none"
    # adapter admin is then refused; with "keys" only keys with the admin scope administer).
    admin_key: str = ""
    # Who may call the inference endpoints (completions, chat, models): "none", anyone (vLLM's
    # default without --api-key; the gateway listens on loopback unless host says otherwise), or
    # "keys", only 'Authorization: Bearer <API key>' with a key made by `dlora keys create` or
    # POST /v1/keys (401 otherwise); each key acts for its tenant, which lists and uses only its
    # own and the public adapters. Callers without a key see the public adapters only.
    auth: str = "none"
    # Host names (the Host header without its port) requests may name beside the loopback ones
    # ("localhost", 127.0.0.0/8, ::1), for DNS rebinding protection; ".example.com": that name and
    # every name under it (Django's form); "*": any. Empty: on a loopback
    # host with auth "none", loopback names only (403 otherwise: a web page whose name rebinds to
    # 127.0.0.1 would use the gateway as its user); else any.
    allowed_hosts: list[str] = []
    # CORS, for a web page of another origin calling the gateway from a browser (vLLM's
    # --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials; gateway/cors.py):
    # the origins it may be called from, as a browser's Origin header spells them
    # ("https://app.example.com", scheme://host[:port]), "*" any. Empty: off, no CORS header sent
    # and OPTIONS answered 405 (vLLM's default is "*": opt in here).
    allowed_origins: list[str] = []
    # With allowed_origins: the methods and the request headers such a page may use ("*": any, as
    # vLLM's defaults), and whether it may send credentials (cookies, TLS client certificates) and
    # read the answers to requests that carry them (vLLM's default: no).
    allowed_methods: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    # Limits of each API key that sets none of its own, counted per gateway process: requests per
    # second on average (0: no limit), the bursts allowed above it (0: one second's worth, at least
    # 1), and requests in progress at once (0: no limit). Over them: 429 with Retry-After.
    key_rate_per_s: float = 0.0
    key_burst: int = 0
    key_concurrency: int = 0
    # Adapter directories must lie inside one of these, and every file read from one must
    # resolve (symlinks followed) inside one too.
    adapter_roots: list[str] = []
    # [gateway.adapter_limits]: what an adapter may be (rank, file size, weight magnitude,
    # scaling), checked at registration; the workers check [worker.engine.adapter_limits] when
    # they load one, keep the two the same.
    adapter_limits: AdapterLimits = AdapterLimits()
    # Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = 1 << 20
    # Seconds without a chunk from the worker (before the first, or between two) after which the
    # request fails with 503 (or an error event on a stream): a worker that died or stopped stepping
    # does not hang it. It starts again whenever the worker holding the request is seen stepping
    # (checked every 2 x heartbeat_ttl_s, so it must be longer): a request queued behind others waits its turn.
    chunk_timeout_s: float = 60.0
    # Seconds to wait for a dispatcher to take a request before answering 503; with none running
    # (one restarting) the request is sent again meanwhile (``hand_over``).
    dispatch_timeout_s: float = 5.0
    # Seconds a connection may take to send a whole request head, counted from when it opens or
    # from its first byte after a finished request; then it is closed (nginx's client_header_timeout).
    header_timeout_s: float = 60.0
    # Seconds a request may take to send its whole body once its head is in; then it is answered
    # 408 (nginx's client_body_timeout, counted over the whole body rather than between reads).
    body_timeout_s: float = 60.0
    # Seconds a connection may sit idle between requests before it is closed (nginx's keepalive_timeout).
    idle_timeout_s: float = 75.0
    # Seconds a streamed answer may wait for its client to take a write; then the connection is
    # closed and the request aborted (nginx's send_timeout): a reader that stopped held its key's
    # slots and its output here for as long as it kept the socket open.
    send_timeout_s: float = 60.0
    # Seconds a stopping gateway (SIGTERM: systemctl stop, dlora up's Ctrl-C) lets the requests it
    # already took finish, new ones answered 503 (and /healthz 503) meanwhile; what still runs then
    # ends as at 0: at once, a 503 or a stream's error event (vLLM's --shutdown-timeout, 0 its
    # default). Keep it under the unit's TimeoutStopSec less 10 s (60 s: at most 50).
    shutdown_timeout_s: float = 0.0
    # Public adapters named in /metrics' series by adapter, at most (the first served, until
    # removed; ~89 series each); the rest count under adapter="(other)". vLLM names none.
    max_adapter_labels: int = 256
    # One log line per HTTP request once it has ended (method, path, status, seconds, request id,
    # model, key id; health checks and scrapes at debug level): vLLM's uvicorn access log.
    access_log: bool = True
    # Open connections at most; more are answered 503 and closed at once. Lowered at start to what
    # the file-descriptor limit (ulimit -n) allows with 256 to spare for everything else.
    max_connections: int = 10000
    # Open connections at most from one client address; more are answered 429 and closed at once.
    # 0: no limit (behind a proxy, where every client has the proxy's address).
    max_connections_per_client: int = 1024
    # Seconds a Responses API response asked with store (OpenAI's default) is kept in Redis, for
    # GET /v1/responses/{id} and a later request's previous_response_id; then it expires. A day:
    # an agent's chain of turns, and a session resumed later that day, find theirs, while what
    # Redis holds stays a day of traffic (OpenAI keeps 30 days; vLLM keeps them in memory for
    # ever). 0: nothing is stored, previous_response_id refused (vLLM's default).
    responses_ttl_s: float = 86400.0
    # Bytes one stored response may take (its object and its conversation's input items, JSON),
    # at most: a larger one is answered but not kept (its "store" false) so one huge conversation
    # cannot fill Redis. 8 MiB: a 128k-token context's conversation a few times over.
    responses_max_bytes: int = 8 << 20

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("adapter_limits", self.adapter_limits.check())
        if not 0 < self.port < 65536:
            bad.append(("port", self.port, "must be in 1..65535"))
        if not self.model:
            bad.append(("model", self.model, "must name the base model directory"))
        for field in ("max_body_bytes", "responses_max_bytes"):
            if getattr(self, field) <= 0:
                bad.append((field, getattr(self, field), "must be > 0"))
        if not 0 <= self.responses_ttl_s <= MAX_RESPONSES_TTL_S:
            why = f"must be from 0 (nothing stored) to {MAX_RESPONSES_TTL_S:g} (ten years)"
            bad.append(("responses_ttl_s", self.responses_ttl_s, why))
        positive: tuple[str, ...] = ("chunk_timeout_s", "dispatch_timeout_s", "header_timeout_s", "body_timeout_s")
        positive += ("idle_timeout_s", "send_timeout_s")
        for field in (*positive, "max_connections"):
            if getattr(self, field) <= 0:
                bad.append((field, getattr(self, field), "must be > 0"))
        if 0 < self.chunk_timeout_s <= 2 * self.heartbeat_ttl_s:  # (the wait starts again at a check only)
            why = f"must be above 2 x heartbeat_ttl_s ({2 * self.heartbeat_ttl_s:g} s): a queued request's check"
            bad.append(("chunk_timeout_s", self.chunk_timeout_s, f"{why} that its worker steps comes that often"))
        if self.generation_config not in GENERATION_CONFIGS:
            bad.append(("generation_config", self.generation_config, f"must be one of {', '.join(GENERATION_CONFIGS)}"))
        if self.chat_template_content_format not in CONTENT_FORMATS:
            bad.append(
                (
                    "chat_template_content_format",
                    self.chat_template_content_format,
                    f"must be one of {', '.join(CONTENT_FORMATS)}",
                )
            )
        if self.tool_call_parser and self.tool_call_parser not in PARSERS:
            bad.append(("tool_call_parser", self.tool_call_parser, f"must be empty or one of {', '.join(PARSERS)}"))
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            why = f"must be empty or one of {', '.join(REASONING_PARSERS)}"
            bad.append(("reasoning_parser", self.reasoning_parser, why))
        # The bearer token is read stripped and no header carries a control character: such a key
        # (a secret file's trailing newline) could never be given. Its value is not printed.
        # (a tab inside is a header's, as a space: aiohttp hands 'Bearer s3\tcret' on whole)
        if self.admin_key != self.admin_key.strip() or any(c in _NO_HEADER_CHARS for c in self.admin_key):
            bad.append(("admin_key", "<hidden>", "has whitespace at its ends or a control character (a newline?)"))
        for name in self.allowed_hosts:
            if not name.strip(" .") or "/" in name:
                bad.append(("allowed_hosts", name, "must be host names or addresses (no scheme or path), or '*'"))
            elif "*" in name and name != "*":  # Starlette's "*.example.com" matched no Host here
                why = "takes '*' alone; a domain and every name under it is '.example.com'"
                bad.append(("allowed_hosts", name, why))
        bad += self._cors_problems()
        if self.auth not in AUTH_MODES:
            bad.append(("auth", self.auth, f"must be one of {', '.join(AUTH_MODES)}"))
        if not (self.key_rate_per_s == 0 or (math.isfinite(self.key_rate_per_s) and self.key_rate_per_s >= MIN_RATE)):
            bad.append(("key_rate_per_s", self.key_rate_per_s, f"must be 0 (no limit) or >= {MIN_RATE:g}"))
        for field in ("key_burst", "key_concurrency", "max_adapter_labels"):
            if getattr(self, field) < 0:
                bad.append((field, getattr(self, field), "must be >= 0"))
        if not (math.isfinite(self.shutdown_timeout_s) and self.shutdown_timeout_s >= 0):
            bad.append(("shutdown_timeout_s", self.shutdown_timeout_s, "must be >= 0 (0: end requests at once)"))
        if self.max_connections_per_client < 0:
            bad.append(("max_connections_per_client", self.max_connections_per_client, "must be >= 0 (0: no limit)"))
        return bad

    def _cors_problems(self) -> Problems:
        """An origin no Origin header could equal, a method or header that is no HTTP token,
        credentials without origins: each named."""
        bad: Problems = []
        for origin in self.allowed_origins:
            if origin == "*":
                continue
            if (m := _ORIGIN.fullmatch(origin)) is None:
                why = "must be '*' or scheme://host[:port] as a browser's Origin spells it (lower case, nothing after)"
                bad.append(("allowed_origins", origin, why))
            elif m[2] is not None and m[2] == _DEFAULT_PORTS.get(m[1]):
                bad.append(("allowed_origins", origin, f"a browser's Origin leaves out {m[1]}'s default port {m[2]}"))
        for field in ("allowed_methods", "allowed_headers"):
            for name in getattr(self, field):
                if name != "*" and not _TOKEN.fullmatch(name):
                    bad.append((field, name, "must be '*' or HTTP token names (GET, Authorization, ...)"))
        if self.allow_credentials and not self.allowed_origins:
            bad.append(("allow_credentials", True, "does nothing without allowed_origins: set those too"))
        return bad
