"""``dlora up``, the command: it starts the stack (``launcher.LocalStack``), prints where it
serves (URL, NATS and Redis logins, admin key, status page, metrics, a curl line), watches its
services as systemd's ``Restart=on-failure`` would, and stops it on Ctrl-C, SIGTERM or SIGHUP
(a second one hurries the stop)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping

from dlora.common.settings import SettingsError, unknown_env, unread_config
from dlora.model.config import served_name
from dlora.services.config_file import SERVICES
from dlora.services.gateway.openai import APIError
from dlora.services.launcher import LocalStack
from dlora.services.servers import NATS_DEFAULT_PORT, port_is_free
from dlora.services.stack_stop import workers_drain_s


def given_key(environ: Mapping[str, str], config: str | None = None) -> str:
    """Where the admin key ``dlora up`` was given comes from, as a user would paste it: the
    variable that sets it (the gateway's own first, as the settings read them), else the entry of
    the settings file (``config``, else ``$DLORA_CONFIG``, else dlora.toml). Never the key
    (printed, it went into logs). It named dlora.toml for a key from ``DLORA_ADMIN_KEY`` (the
    settings had read it into the same field): a user looked for a file."""
    for name in ("DLORA_GATEWAY_ADMIN_KEY", "DLORA_ADMIN_KEY"):
        if environ.get(name):
            return f"${name}"
    return f"<admin_key of {config or environ.get('DLORA_CONFIG') or 'dlora.toml'}>"


def up(workers: int, model: str | None, lora: list[str], port: int | None, config: str | None) -> int:
    """Run ``dlora up`` until Ctrl-C, SIGTERM or SIGHUP, or until a service the stack cannot do
    without ends. Returns the exit status: 0 stopped as asked, 1 a service ended or the start
    failed, 2 bad settings (each said on stderr), 128 + the signal when stopped while starting."""
    stop = 0  # the signal that asked to stop
    stack: LocalStack | None = None

    def on_signal(signum: int, _: object) -> None:
        nonlocal stop
        first, stop = not stop, stop or signum
        if not first and stack is not None:  # again: the services stop now (a worker hands over at once)
            stack.hurry()  # (vLLM's and uvicorn's users press Ctrl-C twice to force a stop)
        elif first and (stack is None or not stack.up):  # still starting: break off the wait, once
            raise KeyboardInterrupt  # (start() stops what started; a second signal must not cut that)

    # SIGHUP too (a closed terminal, a dropped ssh session): by default it killed dlora up outright.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    for said in [*unknown_env(os.environ, SERVICES).values(), *unread_config(config)]:  # what its services read
        print(f"dlora up: warning: {said}", file=sys.stderr)
    try:
        # NATS's usual port when it is free, so `dlora loadgen --target nats://127.0.0.1:4222` finds it
        nats_port = NATS_DEFAULT_PORT if port_is_free(NATS_DEFAULT_PORT) else None
        stack = LocalStack(workers, model, lora, port, config, nats_port=nats_port)
        stack.start()
        served = served_name(stack.model_dir, stack.base.served_model_name)  # what requests name as their model
        first = next(iter(stack.loras), served)
        print(
            f"\ndlora is up: {stack.url}  ({workers} worker{'s' * (workers != 1)}, model {served}, "
            f"adapters: {', '.join(stack.loras) or 'none'})"
        )
        shown = given_key(os.environ, stack.config) if stack.admin_key_given else stack.admin_key
        nats_shown, redis_shown = stack.shown_logins()
        print(f"NATS (applications): {nats_shown}  Redis: {redis_shown}  admin key: {shown}")
        # Not with #key=: the page takes it from the link out of the tab's history, not the browser's
        # saved one, which syncs with the user's profile (a helper, in Chromium): the page asks for it.
        print(f"status page: {stack.url}/dashboard")
        print("metrics: " + "  ".join(f"{name} {url}" for name, url in stack.metrics_urls.items()))
        # With auth = "keys" inference wants a key: the admin key serves until one is made.
        # (a key given is not printed: the environment's is named, dlora.toml's is to be pasted)
        bearer = given_key(os.environ, stack.config) if stack.admin_key_given else stack.admin_key
        key = f' -H "Authorization: Bearer {bearer}"' if stack.base.auth == "keys" else ""
        print(
            f"try:\n  curl -s {stack.url}/v1/completions -H 'Content-Type: application/json'{key} "
            f'-d \'{{"model": "{first}", "prompt": "kalo remi", "max_tokens": 16, "temperature": 0}}\'\n',
            flush=True,
        )
        left: set[int] = set()  # workers that stopped cleanly or failed for good, left out
        while not stop:
            for i, name, code in stack.exited():
                if i in left:
                    continue
                done, said = stack.after_exit(i, name, code)
                print(f"dlora up: {said}", file=sys.stderr, flush=True)
                if done == "stop":
                    return 1
                if done == "left":
                    left.add(i)
            time.sleep(0.2)
        with contextlib.suppress(OSError):  # its terminal gone (SIGHUP): EIO, and the stop must go on
            drain, finish = workers_drain_s(config, {}), stack.base.shutdown_timeout_s
            gateway = f"the gateway's up to {finish:g} s, " if finish else ""
            print(
                f"dlora up: stopping; workers finish their requests (up to {drain:g} s), {gateway}"
                "a second Ctrl-C or SIGTERM hands them over",
                file=sys.stderr,
                flush=True,
            )
        return 0
    except SettingsError as e:  # as dlora serve says it
        print(f"dlora up: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, APIError, ValueError, OSError) as e:
        print(f"dlora up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dlora up: interrupted while starting; stopped what had started", file=sys.stderr)
        return 128 + (stop or signal.SIGINT)
    finally:
        if stack is not None:
            stack.stop()
