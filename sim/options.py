"""``dlora simulate``'s options, apart from the simulator: every ``dlora`` command builds the whole
parser, and the simulator imports the engine (torch), which a service process must not load for a
parser it never uses (a dispatcher's RSS went from 63 to 280 MB)."""

from __future__ import annotations

import argparse

from dlora.services.dispatcher.choose import DispatchMode
from dlora.services.worker.policy.config import PolicyName
from dlora.sim.cost import PROFILES


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dlora.loadgen.arg_types import above_zero, positive, ranks
    from dlora.loadgen.workload_options import add_workload_arguments

    p.add_argument(
        "--profile",
        default="dlora-artifact",
        help=f"engine cost profile: {', '.join(PROFILES)}, or calibrated:PATH (`dlora bench engine`, "
        "`bench cluster`, or `bench policy` / `bench e2e` JSON: fitted to their runs' own steps; "
        "default %(default)s)",
    )
    p.add_argument(
        "--replicas", type=positive, default=4, help="engines simulated, one worker each (default %(default)s)"
    )
    p.add_argument(
        "--ranks",
        type=ranks,
        default="16",
        help="LoRA ranks, comma-separated, given to the adapters in turn (default %(default)s)",
    )
    p.add_argument("--max-loras", type=positive, default=8, help="device slots per replica (default %(default)s)")
    p.add_argument(
        "--max-cpu-loras",
        type=positive,
        help="adapters each replica's host memory holds (vLLM's max_cpu_loras); the others are read "
        "from disk when a request or the dispatcher's placement asks for them (default: every adapter, "
        "up to 4096, held from the start: no disk tier)",
    )
    p.add_argument(
        "--max-num-seqs", type=positive, default=64, help="requests in one step (max_num_seqs; default %(default)s)"
    )
    p.add_argument(
        "--policy", choices=[n.value for n in PolicyName], default=PolicyName.DLORA.value, help="default %(default)s"
    )
    p.add_argument(
        "--dispatch",
        choices=[m.value for m in DispatchMode],
        default=DispatchMode.PROACTIVE.value,
        help="default %(default)s",
    )
    p.add_argument("--migrate", action="store_true", help="run the migrator (its trigger, planner and moves)")
    p.add_argument(
        "--stats-interval",
        type=above_zero,
        default=0.5,
        help="seconds between a replica's stats (0.001 to under 5; default 0.5)",
    )
    p.add_argument(
        "--migrate-interval", type=above_zero, help="seconds between the migrator's looks (with --migrate; default 1)"
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="ask the policy at every step (no fast-forward of steps that repeat the last one); slower",
    )
    p.add_argument(
        "--jobs",
        type=positive,
        default=1,
        help="processes the replicas are split over (they run apart between two stats or looks; "
        "the results are the same for any number; default %(default)s)",
    )
    p.add_argument("--json", help="write the result here (its folders made as needed)")
    add_workload_arguments(p)
