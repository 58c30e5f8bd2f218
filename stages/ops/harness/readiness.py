"""When started stages are serving: every consumer group of theirs holds every partition of
its inputs, as the stages themselves report it (``rtpipe_assigned_partitions`` on their
``/metrics``, stages/shared/metrics.py ``Assignment``).

Asking the broker instead (``describe_consumer_groups`` twice a second) crashed the process
that asked: librdkafka 2.12 aborts in its admin coordinator path
(``rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0' failed``) on the
three-broker stack. The stages' own view needs no coordinator request, only a metadata one
for the partition counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from stages.ops.scrape import family_samples
from stages.shared.settings import Settings, StageName
from stages.shared.topology import stage_groups

if TYPE_CHECKING:
    from stages.ops.harness.processes import StageProcess

ASSIGNED = "rtpipe_assigned_partitions"


def held_partitions(host: str, ports: Iterable[int], timeout_s: float = 2.0) -> dict[str, int]:
    """Partitions held per consumer group, summed over the processes serving metrics on
    ``ports`` (a process not serving yet holds none)."""
    held: dict[str, int] = {}
    for sample in family_samples(host, ports, ASSIGNED, timeout_s):
        group = sample.labels.get("group", "")
        held[group] = held.get(group, 0) + int(sample.value)
    return held


def input_partitions(settings: Settings, topics: Sequence[str], timeout_s: float = 5.0) -> int:
    """Partitions of ``topics`` by the cluster's metadata (0 for a topic not there yet)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka.client_config())
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return 0
    return sum(len(meta.topics[t].partitions) for t in topics if t in meta.topics)


def wait_until_ready(
    settings: Settings, procs: Sequence[StageProcess], timeout_s: float = 180.0
) -> float:
    """Wait until the consumer groups of ``procs`` hold all their input partitions, so a
    replay measures the pipeline rather than its start-up. Returns the seconds waited.

    Raises:
        RuntimeError: a stage process exited meanwhile.
        TimeoutError: not ready within ``timeout_s``.
    """
    from stages.ops.harness.processes import replica_settings

    started = time.monotonic()
    groups: dict[str, tuple[str, ...]] = {}
    ports: list[int] = []
    for sp in procs:
        name: StageName = sp.name  # type: ignore[assignment]
        groups.update(stage_groups(settings, name))
        ports.extend(replica_settings(settings, sp.replica).metrics.ports(name))
    # A stage restarted on the same replica serves on the same ports: count them once.
    ports = list(dict.fromkeys(ports))
    host = settings.metrics.host if settings.metrics.host not in ("", "0.0.0.0") else "127.0.0.1"
    needed: dict[str, int] = {}
    while time.monotonic() - started < timeout_s:
        dead = [sp.name for sp in procs if sp.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"stage(s) exited during start-up: {dead}; see {procs[0].log}")
        for group, topics in groups.items():
            if not needed.get(group):
                needed[group] = input_partitions(settings, topics)
        held = held_partitions(host, ports)
        if all(n > 0 and held.get(g, 0) >= n for g, n in needed.items()):
            return time.monotonic() - started
        time.sleep(0.25)
    raise TimeoutError(f"stages not ready after {timeout_s:.0f}s; see {procs[0].log.parent}")
