"""The Redis Cluster stack's node bus ports (infra/stack/nodes.py): next to the node for a new one,
out of Linux's ephemeral range; what ``nodes.conf`` records for one that has run before."""

from __future__ import annotations

from pathlib import Path

from infra.stack import RedisNode

EPHEMERAL = range(32768, 61000)


def test_new_node_bus_port_is_next_to_it(tmp_path: Path) -> None:
    node = RedisNode(port=30701, dir=tmp_path)
    assert node.bus_port == 30801
    assert node.bus_port not in EPHEMERAL


def test_a_node_that_ran_keeps_the_bus_port_its_peers_know(tmp_path: Path) -> None:
    (tmp_path / "nodes.conf").write_text(
        "a1 127.0.0.1:30702@40702 master - 0 0 1 connected 5461-10922\n"
        "b2 127.0.0.1:30701@40701,myhost myself,master - 0 0 2 connected 0-5460\n"
        "vars currentEpoch 6 lastVoteEpoch 0\n"
    )
    assert RedisNode(port=30701, dir=tmp_path).bus_port == 40701


def test_a_conf_without_its_own_entry_counts_as_new(tmp_path: Path) -> None:
    (tmp_path / "nodes.conf").write_text("vars currentEpoch 0 lastVoteEpoch 0\n")
    assert RedisNode(port=30701, dir=tmp_path).bus_port == 30801


def test_broker_command_line_carries_the_extra_jvm_options_after_the_defaults(
    tmp_path: Path,
) -> None:
    from infra.stack.config import kafka_java
    from stages.shared.settings import Settings

    base = Settings(home=tmp_path)
    plain = kafka_java(base, tmp_path / "libs", "kafka.Kafka", "server.properties")
    assert plain[1:3] == ["-Xmx1g", "-XX:+UseG1GC"] and plain[-2:] == [
        "kafka.Kafka",
        "server.properties",
    ]
    stack = base.stack.model_copy(
        update={"kafka_jvm_opts": " -XX:+UseSerialGC  -XX:CICompilerCount=2 "}
    )
    cmd = kafka_java(
        base.model_copy(update={"stack": stack}), tmp_path / "libs", "kafka.Kafka", "x"
    )
    # Later JVM flags win: the extra ones come after the defaults and before the class path.
    assert cmd[1:5] == ["-Xmx1g", "-XX:+UseG1GC", "-XX:+UseSerialGC", "-XX:CICompilerCount=2"]
    assert cmd.index("-cp") > 4


def _fake_proc(root: Path, pid: int, threads: dict[str, tuple[str, int, int]]) -> None:
    """A ``/proc/PID/task`` tree: thread id -> (name, utime ticks, stime ticks)."""
    for tid, (name, utime, stime) in threads.items():
        task = root / str(pid) / "task" / tid
        task.mkdir(parents=True)
        (task / "comm").write_text(name + "\n")
        # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        # utime stime ...: a name with spaces and parentheses must not shift the fields.
        fields = ["S", *["0"] * 10, str(utime), str(stime), "0", "0"]
        (task / "stat").write_text(f"{tid} ({name}) " + " ".join(fields) + "\n")


def test_broker_cpu_counts_every_thread_and_the_jit_compilers_apart(tmp_path: Path) -> None:
    from infra.stack.broker_cpu import BrokerCpu, CpuSample, thread_cpu

    _fake_proc(
        tmp_path,
        42,
        {
            "1": ("C2 CompilerThre", 300, 100),
            "2": ("C1 CompilerThre", 50, 50),
            "3": ("data-plane-kafk", 200, 0),
            "4": ("odd (name) x", 0, 100),
        },
    )
    total, jit = thread_cpu(tmp_path / "42", 100.0)
    assert (total, jit) == (8.0, 5.0)
    # A process that is gone reads as nothing, not an error.
    assert thread_cpu(tmp_path / "43", 100.0) == (0.0, 0.0)
    probe = BrokerCpu(42, proc_root=tmp_path)
    assert probe.sample().total_s > 0
    cores = BrokerCpu.cores(CpuSample(10.0, 1.0, 0.5), CpuSample(12.0, 3.0, 1.5))
    assert cores == {"broker cores": 1.0, "broker jit cores": 0.5}
    assert BrokerCpu.cores(CpuSample(10.0, 1.0, 0.5), CpuSample(10.0, 3.0, 1.5)) == {}
