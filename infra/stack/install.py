"""What a component needs before it starts: its binaries on ``PATH`` (``preflight``) and, for
Kafka, the broker's jars, resolved from Maven Central into a shared cache (``ensure_kafka``)."""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from infra.stack.components import Component, validate_components
from infra.stack.errors import StackError
from stages.shared.settings import Settings

logger = logging.getLogger(__name__)

_KAFKA_MARKER = ".complete"
_LOG4J_VERSION = "2.24.3"  # what kafka_2.13 4.1.1 pulls in; the slf4j binding must match

# The apt package that provides each binary, for the error message.
_INSTALL_HINT: dict[str, str] = {
    "java": "openjdk-17-jre-headless",
    "mvn": "maven",
    "redis-server": "redis-server",
    "prometheus": "prometheus",
    "openssl": "openssl",
}


def _binaries(component: Component, *, need_maven: bool = True) -> list[str]:
    if component == "kafka":
        return ["java", "mvn"] if need_maven else ["java"]
    if component == "redis":
        return ["redis-server"]
    return ["prometheus"]


def preflight(components: Iterable[str], settings: Settings | None = None) -> None:
    """Fail fast when a binary a component needs is missing.

    Args:
        components: Component names to check (``kafka``, ``redis``, ``prometheus``).
        settings: When given and Kafka's jars are already cached, ``mvn`` is not required.

    Raises:
        StackError: A component name is unknown or a binary is not on ``PATH``; the message
            names what to install.
    """
    comps = validate_components(components)
    need_maven = settings is None or not _kafka_complete(_kafka_home(settings))
    secure = settings is not None and settings.stack.secure
    for comp in comps:
        extra = ["openssl"] if secure and comp != "prometheus" else []
        for binary in [*_binaries(comp, need_maven=need_maven), *extra]:
            if shutil.which(binary) is None:
                raise StackError(
                    f"{binary} not found (needed by {comp}): run `make bootstrap` or "
                    f"`apt-get install {_INSTALL_HINT[binary]}`"
                )


def _kafka_home(settings: Settings) -> Path:
    return (settings.stack.cache_dir / f"kafka-{settings.stack.kafka_version}").resolve()


def _kafka_complete(home: Path) -> bool:
    return (home / _KAFKA_MARKER).is_file() and any((home / "libs").glob("kafka_2.13-*.jar"))


def _kafka_pom(version: str) -> str:
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rtpipe</groupId>
  <artifactId>kafka-dist</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <!-- The broker itself (KRaft included); kafka-tools is left out: it pulls connect-runtime. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- Kafka logs through slf4j 1.7; without a binding it logs nothing at all. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{_LOG4J_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"""


def ensure_kafka(settings: Settings) -> Path:
    """Resolve Kafka's jars from Maven Central into the shared cache, once.

    The jars land in ``cache_dir/kafka-VERSION/libs``; a marker file is written only after a
    complete download, so an interrupted run is simply redone. Concurrent callers serialise on
    a lock file.

    Args:
        settings: Provides ``stack.cache_dir`` and ``stack.kafka_version``.

    Returns:
        The directory holding every jar of the broker's runtime class path.

    Raises:
        StackError: ``mvn`` is missing or the resolution fails (the message has Maven's tail).
    """
    home = _kafka_home(settings)
    libs = home / "libs"
    if _kafka_complete(home):
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _kafka_complete(home):  # another process finished while we waited
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(
                "mvn not found (needed to fetch Kafka): run `make bootstrap` or "
                "`apt-get install maven`"
            )
        version = settings.stack.kafka_version
        (home / "pom.xml").write_text(_kafka_pom(version))
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(libs, ignore_errors=True)
        logger.info("resolving Kafka %s jars from Maven Central into %s", version, libs)
        proc = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(home / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise StackError(f"mvn could not resolve Kafka {version}: {' | '.join(tail)}")
        staging.rename(libs)
        (home / _KAFKA_MARKER).write_text(f"kafka_2.13 {version}\n")
    return libs
