"""The worker's settings (``[worker]`` in ``dlora.toml``); see ``dlora.common.settings``. Torch-free:
settings load and are checked before the model's weights are read."""

from __future__ import annotations

from dlora.common.settings import Common, Problems, nested_problems
from dlora.services.worker.engine.config import EngineConfig


class WorkerSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # This worker's name on the bus and in Redis; unique in the cluster.
    worker_id: str = "worker-0"
    # The base model directory (a Hugging Face layout).
    model: str = ""
    # The base model's served name (the gateway's too: vLLM's --served-model-name), which labels
    # its metrics; empty: the directory's name.
    served_model_name: str = ""
    # Seconds between two stats messages (the dispatcher's and migrator's view, and the heartbeat).
    stats_interval_s: float = 0.5
    # torch intra-op threads; 0: torch's default (all cores). One worker per core wants 1.
    torch_threads: int = 0
    # Seconds a stopping worker (SIGTERM: systemctl stop) goes on with the requests it runs, taking
    # no new ones, before it hands the rest to the other workers (each resumes there after the
    # tokens its client has); 0: hand them over at once. Under systemd's TimeoutStopSec (60 s).
    drain_timeout_s: float = 10.0
    # [worker.engine] and [worker.engine.policy]: how the engine runs, and its batching policy.
    engine: EngineConfig = EngineConfig()

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("engine", self.engine.check())
        if not self.model:
            bad.append(("model", self.model, "must name the base model directory"))
        if not self.worker_id or "." in self.worker_id or "*" in self.worker_id:
            bad.append(("worker_id", self.worker_id, "must be non-empty without '.' or '*' (it is a NATS token)"))
        if not 0 < self.stats_interval_s < self.heartbeat_ttl_s / 2:
            # a beat later than half the TTL is taken for a stall (see ProgressRecords.beat)
            bad.append(("stats_interval_s", self.stats_interval_s, "must be > 0 and under half of heartbeat_ttl_s"))
        if self.drain_timeout_s < 0:
            bad.append(("drain_timeout_s", self.drain_timeout_s, "must be >= 0"))
        if self.torch_threads < 0:
            bad.append(("torch_threads", self.torch_threads, "must be >= 0"))
        return bad
