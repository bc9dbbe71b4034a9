"""The test YARN: Hadoop's MiniYARNCluster (tests/yarn_cluster) as a child JVM on loopback.

Built by hack/yarn/build.sh (Maven, cached). The JVM writes a HADOOP_CONF_DIR for spark-submit,
prints the ResourceManager's web address and takes commands on stdin (``restart-rm``, ``stop``).
Its NodeManager runs containers as local processes, so launchers and kernels run for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import REPO_ROOT

MAIN_CLASS = "io.kerneloperator.yarncluster.MiniYarn"
# Hadoop 3.4 on Java 17 reflects into these packages (Guice, its RPC and web layers).
JAVA_OPENS = [
    f"--add-opens=java.base/{package}=ALL-UNNAMED"
    for package in (
        "java.lang",
        "java.lang.reflect",
        "java.util",
        "java.util.concurrent",
        "java.io",
        "java.net",
        "java.nio",
        "sun.nio.ch",
    )
]
FINAL_STATES = ("FINISHED", "FAILED", "KILLED")
# Tests talk to loopback only: never through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def build_yarn() -> Path:
    """Build (once) and return the folder with the cluster and ApplicationMaster jars."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "yarn" / "build.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def java_home() -> str:
    """JAVA_HOME for the NodeManager's containers ({{JAVA_HOME}}/bin/java)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("Java is not installed; run hack/install-system-deps.sh.")
    return str(Path(os.path.realpath(java)).parents[1])


@dataclass
class MiniYarn:
    work_dir: Path
    jars: Path = field(default_factory=build_yarn)
    web: str = ""
    started_in: float = 0.0
    proc: subprocess.Popen[str] | None = None

    @property
    def conf_dir(self) -> Path:
        return self.work_dir / "conf"

    @property
    def am_jar(self) -> Path:
        return self.jars / "rko-yarn-am.jar"

    @property
    def am_classpath(self) -> str:
        """What a NodeManager's containers get as Hadoop's classpath: the conf dir and its jars."""
        return f"{self.conf_dir}:{(self.jars / 'cluster.classpath').read_text().strip()}"

    def start(self, timeout: float = 120.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        classpath = (
            f"{self.jars / 'rko-yarn-cluster.jar'}:{(self.jars / 'cluster.classpath').read_text().strip()}"
        )
        env = {**os.environ, "JAVA_HOME": java_home()}
        began = time.monotonic()
        self.proc = subprocess.Popen(
            ["java", "-Xmx768m", *JAVA_OPENS, "-cp", classpath, MAIN_CLASS, str(self.work_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.work_dir / "yarn.log", "ab"),  # noqa: SIM115 - handed to the child
            text=True,
            env=env,
            cwd=self.work_dir,
        )
        self._await_line("READY", timeout)
        self.started_in = time.monotonic() - began

    def _await_line(self, marker: str, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("RM_WEB "):
                self.web = line.split(" ", 1)[1]
            if line == marker:
                return
            if line.startswith("FAILED "):
                raise RuntimeError(
                    f"MiniYARNCluster failed: {line.split(' ', 1)[1]}; see {self.work_dir / 'yarn.log'}"
                )
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"MiniYARNCluster did not print {marker}; see {self.work_dir / 'yarn.log'}")

    def restart_resource_manager(self, timeout: float = 120.0) -> None:
        """Restart the ResourceManager on the same ports; running applications are recovered."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("restart-rm\n")
        self.proc.stdin.flush()
        self._await_line("RM_RESTARTED", timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    # -- the REST API, for tests to check what YARN says -----------------------------------------
    def get(self, path: str) -> dict[str, Any]:
        with _OPENER.open(f"{self.web}/ws/v1/cluster{path}", timeout=10) as response:
            return dict(json.load(response))

    def applications(self) -> list[dict[str, Any]]:
        return list((self.get("/apps").get("apps") or {}).get("app") or [])

    def application(self, app_id: str) -> dict[str, Any]:
        return dict(self.get(f"/apps/{app_id}")["app"])

    def running_applications(self) -> list[dict[str, Any]]:
        return [a for a in self.applications() if a["state"] not in FINAL_STATES]

    def kill(self, app_id: str) -> None:
        request = urllib.request.Request(
            f"{self.web}/ws/v1/cluster/apps/{app_id}/state?user.name=admin",
            data=json.dumps({"state": "KILLED"}).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with _OPENER.open(request, timeout=10):
            pass


def spark_home() -> Path:
    """The Spark that PyPI's pyspark ships (jars, spark-submit), in this Python's environment."""
    import pyspark

    return Path(pyspark.__file__).parent


# Spark on this YARN: driver and executors on loopback only, pyspark's jars used in place.
SPARK_LOOPBACK_CONF = {
    "spark.yarn.appMasterEnv.SPARK_LOCAL_IP": "127.0.0.1",
    "spark.yarn.appMasterEnv.SPARK_LOCAL_HOSTNAME": "localhost",
    "spark.executorEnv.SPARK_LOCAL_IP": "127.0.0.1",
    "spark.executorEnv.SPARK_LOCAL_HOSTNAME": "localhost",
    "spark.executor.instances": "1",
    "spark.executor.cores": "1",
    "spark.ui.enabled": "false",
}


def spark_opts() -> str:
    """spark-submit options for this YARN. The NodeManager is on this machine, so Spark's jars
    are used where pyspark installed them instead of being uploaded for every kernel (what
    spark.yarn.archive does on a real cluster)."""
    conf = {"spark.yarn.jars": f"local:{spark_home()}/jars/*", **SPARK_LOOPBACK_CONF}
    return " ".join(f"--conf {key}={value}" for key, value in conf.items())


def operator_env(yarn: MiniYarn, response_bind: str, *allowed: str) -> dict[str, str]:
    """The operator's RKO_YARN_* settings for this YARN (its launchers run on this machine)."""
    return {
        "RKO_RESPONSE_BIND": response_bind,
        "RKO_YARN_ENDPOINT": yarn.web,
        "RKO_YARN_ALLOWED_ENDPOINTS": ",".join([yarn.web, *allowed]),
        "RKO_YARN_AM_JAR": str(yarn.am_jar),
        "RKO_YARN_AM_CLASSPATH": yarn.am_classpath,
        "RKO_YARN_AM_MEMORY_MB": "256",
        "RKO_YARN_PYTHON": sys.executable,
        "RKO_YARN_KERNEL_IP": "127.0.0.1",
        "RKO_SPARK_SUBMIT": str(Path(sys.executable).parent / "spark-submit"),
        "RKO_SPARK_HOME": str(spark_home()),
        "RKO_HADOOP_CONF_DIR": str(yarn.conf_dir),
        "RKO_SPARK_OPTS": spark_opts(),
        "JAVA_HOME": java_home(),
    }
