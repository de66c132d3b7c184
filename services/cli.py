"""The ``dlora`` console script: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from dlora.services.bench_parser import add_bench
from dlora.services.lazy_command import lazy


def _model_make_tiny(args: argparse.Namespace) -> int:
    from dlora.model.make_tiny import make_tiny

    try:
        out = make_tiny(
            args.out, preset=args.preset, arch=args.arch, num_adapters=args.adapters, ranks=args.ranks, seed=args.seed
        )
    except (ValueError, OSError) as e:  # a rank past what serving loads, an --out that cannot be written
        print(f"dlora model make-tiny: {e}", file=sys.stderr)
        return 2
    adapters = f" and {len(out.adapters)} adapters under {out.adapters_dir}" if out.adapters else ""
    print(f"wrote {out.model}{adapters}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A parser whose subcommands' ``--help`` opens with the line its parent lists them by (argparse
    shows ``help`` only there: ``dlora up --help`` said nothing of what it does, where ``vllm serve``'s does)."""

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        add = action.add_parser
        action.add_parser = lambda name, **kw: add(name, **{"description": kw.get("help"), **kw})
        return action

    # Adds this parser's arguments when it first parses (its --help too): see "simulate"
    later: Callable[[argparse.ArgumentParser], None] | None = None

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        # (argparse parses a chosen subcommand with that parser's own parse_known_args)
        if self.later is not None:
            add, self.later = self.later, None
            add(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from dlora.loadgen.arg_types import count, positive, ranks

    p = _Parser(prog="dlora", description="Serve many LoRA adapters on one base model.")
    sub = p.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("make-tiny", help="write a random Llama-family model and PEFT adapters (offline)")
    tiny.add_argument("--out", required=True, help="directory to write (model/ and adapters/ inside)")
    tiny.add_argument("--preset", choices=["tiny", "small", "7b"], default="tiny")
    tiny.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    tiny.add_argument("--adapters", type=count, default=4, help="number of adapters")
    tiny.add_argument(
        "--ranks", type=ranks, default="8,16,32", help="ranks, cycled over the adapters (at most 512: max_lora_rank)"
    )
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_model_make_tiny)

    gen = sub.add_parser(
        "generate",
        help="offline batch generation from a JSONL file",
        # the line format was in the README alone: --help said "JSONL requests"
        description="Serve each line of --input, write one result line each, in input order. A line: "
        '{"id", "adapter": NAME or null, "prompt" or "prompt_token_ids" or "messages", "max_tokens", '
        '"n", ...any SamplingParams field}. A result: {"id", "token_ids", "text", "finish_reason", '
        '"stop_reason"} ({"id", "outputs": [...]} for n > 1), or {"id", "error"} for a line that '
        "cannot be served (the others are; exit status 1).",
    )
    gen.add_argument("--model", required=True, help="Hugging Face model directory")
    gen.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="adapter to register")
    gen.add_argument("--input", required=True, help="JSONL requests, one a line")
    gen.add_argument("--output", required=True, help="JSONL results, one a line")
    gen.add_argument(
        "--mode",
        choices=["merged", "unmerged", "mixed", "dlora"],
        default="unmerged",
        help="merged / unmerged / mixed: that mode only (FCFS); dlora: chosen per step (default %(default)s)",
    )
    gen.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on a GPU, float32 on a CPU",
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1; auto: the first GPU if any, else cpu")
    gen.add_argument("--max-loras", type=int, default=8, help="device adapter slots")
    gen.set_defaults(func=lazy("dlora.services.worker.engine.offline:run_generate"))

    lg = sub.add_parser("loadgen", help="replay a workload open loop against the gateway or NATS; report")
    from dlora.loadgen.options import add_arguments

    add_arguments(lg)
    lg.set_defaults(func=lazy("dlora.loadgen.main:run_loadgen"))

    sim = sub.add_parser("simulate", help="a workload through a simulated cluster: the real cores, a cost model")
    # its options import the cost model (numpy): ~1 s of every `dlora serve` (a gateway's restart), unused
    sim.later = lambda p: importlib.import_module("dlora.sim.options").add_arguments(p)
    sim.set_defaults(func=lazy("dlora.sim.main:run_simulate"))

    serve = sub.add_parser(
        "serve", help="run one service (settings from --config or $DLORA_CONFIG, and DLORA_* variables)"
    )
    serve.add_argument("service", choices=["gateway", "dispatcher", "worker", "migrator"])
    serve.add_argument("--config", help="settings file (dlora.toml; default $DLORA_CONFIG, else none is read)")
    serve.add_argument("--model", help="base model directory (gateway, worker)")
    serve.add_argument("--port", type=int, help="gateway port (gateway)")
    serve.add_argument("--worker-id", help="worker id, a NATS subject token (worker)")
    serve.set_defaults(func=_serve)

    dep = sub.add_parser("deploy", help="install dlora under systemd on this host (deploy/README.md), or remove it")
    dep_sub = dep.add_subparsers(dest="deploy_command", required=True)
    for name, text in (
        ("install", "user, directories, venv, units, /etc/dlora/dlora.toml if absent"),
        ("uninstall", "remove what install added, nothing else"),
    ):
        d = dep_sub.add_parser(name, help=text)
        d.add_argument(
            "--prefix",
            default="/",
            help="root to install under (not /: a tree whose units name paths in it; no user, no systemctl)",
        )
        d.add_argument("--venv", help="an existing virtualenv with dlora installed, instead of making one")
        d.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    dep.set_defaults(func=lazy("dlora.services.deploy:run"))

    upp = sub.add_parser("up", help="start the whole stack on this machine (NATS and Redis too, if not configured)")
    upp.add_argument(
        "--workers", type=positive, default=2, help="worker processes (default 2; several GPUs: one each, round robin)"
    )
    upp.add_argument("--model", help="base model directory (default: the tiny demo model, made if missing)")
    upp.add_argument("--lora", action="append", default=[], metavar="NAME=DIR", help="adapter to register")
    upp.add_argument("--port", type=int, help="gateway port (default: the gateway's port setting, 8000)")
    upp.add_argument("--config", help="settings file (dlora.toml; default $DLORA_CONFIG, else none is read)")
    upp.set_defaults(func=_up)

    keys = sub.add_parser("keys", help="inference API keys: create, list, revoke (on the deployment's Redis and NATS)")
    keys.add_argument("--config", help="dlora.toml (the [gateway] table's NATS and Redis settings)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = keys_sub.add_parser("create", help="make a key for a tenant; it is printed once, only its hash is kept")
    kc.add_argument("--tenant", required=True, help="who the key acts for (its adapters and the public ones)")
    kc.add_argument("--admin", action="store_true", help="also the admin scope: adapter and key administration")
    kc.add_argument("--rate", type=float, help="requests per second on average (0: none; unset: the gateway's)")
    kc.add_argument("--burst", type=int, help="requests in a burst above the rate (unset: the gateway's)")
    kc.add_argument("--concurrency", type=int, help="requests at once (0: none; unset: the gateway's)")
    kc.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    kl = keys_sub.add_parser("list", help="every key: id, tenant, scopes, limits, revoked (never the key)")
    kl.add_argument("--json", action="store_true")
    kr = keys_sub.add_parser("revoke", help="revoke a key by its id (refused from then on, still listed)")
    kr.add_argument("id")
    for each in (kc, kl, kr):  # after the command too (`dlora keys list --config X`), as `dlora up --config X`
        each.add_argument("--config", default=argparse.SUPPRESS, help="dlora.toml (as before the command)")
    keys.set_defaults(func=lazy("dlora.services.keys_cli:run_keys"))

    add_bench(sub)
    return p


def _serve(args: argparse.Namespace) -> int:
    from dlora.common import log
    from dlora.common.bus import ConnectionLost, CredentialsRefused, StoppedConnecting
    from dlora.common.settings import SettingsError, load, unknown_env, unread_config
    from dlora.services.config_file import SERVICES, check_config
    from dlora.services.run import StartupError, exit_now, run_until_signalled
    from dlora.services.worker.engine.faults import DeviceLost

    overrides = {"model": args.model, "port": args.port, "worker_id": args.worker_id}
    cls = SERVICES[args.service]
    if unused := [k for k, v in overrides.items() if v is not None and k not in cls.__struct_fields__]:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)  # dropped without a word, as if taken
        print(f"dlora serve {args.service}: not a setting of the {args.service}: {flags}", file=sys.stderr)
        return 2
    for said in unknown_env(os.environ, SERVICES).values():  # warned, not refused: another tool's may be about
        print(f"dlora serve {args.service}: warning: {said}", file=sys.stderr)
    for said in unread_config(args.config):
        print(f"dlora serve {args.service}: warning: {said}", file=sys.stderr)
    try:
        check_config(args.config)
        settings = load(
            cls, args.service, args.config, overrides={k: v for k, v in overrides.items() if k in cls.__struct_fields__}
        )
    except SettingsError as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    for name in ("nats_url", "redis_url"):  # left empty in the file `dlora deploy install` writes
        if not getattr(settings, name).strip():
            print(
                f"dlora serve {args.service}: {name} is not set (the settings file's top level, or "
                f"DLORA_{name.upper()}); only `dlora up` starts NATS and Redis itself",
                file=sys.stderr,
            )
            return 2
    log.configure(json=settings.log_json, level=settings.log_level)
    if args.service == "gateway":
        from dlora.services.gateway.main import serve
    elif args.service == "dispatcher":
        from dlora.services.dispatcher.main import serve
    elif args.service == "migrator":
        from dlora.services.migrator.main import serve
    else:
        from dlora.services.worker.main import serve
    try:
        run_until_signalled(serve, settings)
    except CredentialsRefused as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    except StoppedConnecting as e:  # told to stop while waiting for NATS: a clean stop
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        exit_now(0)
    except socket.gaierror as e:  # a host name that does not resolve: a traceback, and systemd's restarts
        print(f"dlora serve {args.service}: cannot resolve a host name: {e} (host, metrics_host)", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES) or "bind" not in str(e):
            raise
        print(f"dlora serve {args.service}: cannot listen: {e} (set another port or metrics_port)", file=sys.stderr)
        return 2
    except StartupError as e:
        print(f"dlora serve {args.service}: {e}", file=sys.stderr)
        return 2
    except ConnectionLost as e:  # a new process connects afresh
        print(f"dlora serve {args.service}: {e}; exiting to be restarted", file=sys.stderr)
        return 1
    except DeviceLost as e:  # its requests were handed over; a new process gets a new device context
        print(f"dlora serve {args.service}: the device failed for good ({e}); exiting to be restarted", file=sys.stderr)
        return 1
    exit_now(0)  # stopped: what is left of the process is its teardown (run.py)


def _up(args: argparse.Namespace) -> int:
    from dlora.common import log
    from dlora.services.up import up

    log.configure(json=False)
    return up(args.workers, args.model, args.lora, args.port, args.config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
