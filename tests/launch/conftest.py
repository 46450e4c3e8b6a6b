"""A real one-node SLURM cluster for the launcher's tests: Debian's slurm-wlm and munge, started here.

`slurm_cluster` (session scope) starts munged (unless one answers already), writes a slurm.conf in a
temporary folder (this host as controller and only node, CPU only, free ports, fast requeue), starts
slurmctld and slurmd, waits for `sinfo` to show the node idle, and stops what it started at the end.
Client commands reach it through `SLURM_CONF` in `cluster.env`; jobs submitted with that environment
inherit it, so `scontrol requeue` inside a job finds the same cluster.

When slurm-wlm / munge are not installed, or the tests do not run as root, the tests that use it
are SKIPPED with that reason (pytest's `-ra` summary shows it), so the suite passes on a bare machine;
under CI (`CI=true`, which `.ci/run` sets) they FAIL instead, since `.ci/run` installs the packages.
A cluster that is installed but does not start (a daemon that dies) always FAILS with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class ClusterError(RuntimeError):
    def __init__(self, message: str, prerequisite: bool = False) -> None:
        super().__init__(message)
        self.prerequisite = prerequisite  # packages or root missing, as opposed to a cluster that broke


def in_ci() -> bool:
    """CI=true (GitHub Actions, GitLab and `.ci/run` set it): what a bare machine may skip must run."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlurmCluster:
    """One node, this host; `env` points the SLURM clients at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname().split(".")[0]
        self._started: dict[str, int] = {}  # daemon -> pid, only those this fixture started

    # ---- start / stop --------------------------------------------------------------------------
    def start(self) -> None:
        missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
        if missing:
            raise ClusterError(
                f"not installed: {', '.join(missing)} (apt-get install -y slurm-wlm munge; .ci/run does it)",
                prerequisite=True,
            )
        if os.geteuid() != 0:
            raise ClusterError("starting slurmctld / slurmd needs root (CI runs the suite as root)", prerequisite=True)
        self._start_munge()
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        for daemon in ("slurmctld", "slurmd"):
            self._daemon(daemon, [_which(daemon), "-f", str(self.conf)], self.root / f"{daemon}.pid")
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            done = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = done.stdout.strip()
            if done.returncode == 0 and state == "idle":
                return
            for daemon in ("slurmctld", "slurmd"):
                if not _alive(self._started[daemon]):
                    raise ClusterError(f"{daemon} exited during start-up:\n{self.logs()}")
            time.sleep(0.5)
        raise ClusterError(f"the node is not idle after 60 s (sinfo: {state!r}):\n{self.logs()}")

    def _start_munge(self) -> None:
        if subprocess.run([_which("munge"), "-n"], capture_output=True).returncode == 0:
            return  # a munged answers already: use it
        if not MUNGE_KEY.exists():
            done = subprocess.run([_which("mungekey") or "mungekey", "--create"], capture_output=True, text=True)
            if done.returncode != 0:
                raise ClusterError(f"mungekey --create failed: {done.stderr.strip()}")
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        MUNGE_RUN.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        self._daemon("munged", ["runuser", "-u", "munge", "--", _which("munged")], MUNGE_RUN / "munged.pid")
        deadline = time.monotonic() + 20
        while subprocess.run([_which("munge"), "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError("munged started but `munge -n` still fails (see /var/log/munge/munged.log)")
            time.sleep(0.2)

    def _daemon(self, name: str, command: list[str], pid_file: Path) -> None:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"{name} did not start (exit {done.returncode}): {done.stderr.strip()}\n{self.logs()}")
        deadline = time.monotonic() + 20
        while (pid := _pid(pid_file)) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} wrote no pid file {pid_file}\n{self.logs()}")
            time.sleep(0.1)
        self._started[name] = pid

    def _config(self) -> str:
        r = self.root
        cpus = max(2, os.cpu_count() or 2)
        ctld_port, slurmd_port = _free_ports(2)
        return f"""\
ClusterName=kit-tests
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire + 1 s after it stopped (the default is 120 s)
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# jobs stay visible to `scontrol show job` for an hour after they end
MinJobAge=3600
# after a requeue SLURM waits this long before it SIGKILLs what is left of the job
KillWait=2
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=tests Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        if self._started.get("slurmctld") and _alive(self._started["slurmctld"]):
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                    time.sleep(0.5)
        for names in (("slurmd", "slurmctld"), ("munged",)):  # munge last: the daemons use it to the end
            pids = [pid for name in names if (pid := self._started.pop(name, None)) is not None and _alive(pid)]
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)

    # ---- using it ------------------------------------------------------------------------------
    def run(self, command: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o`'s fields (JobState, Restarts, ExitCode, NumTasks, ...)."""
        text = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Waits for the job to end (a requeued job ends after its last start); returns its fields."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not end in {timeout} s: {info}\n{self.logs()}")
            time.sleep(1)

    def logs(self, lines: int = 30) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)


def start_or_skip(cluster: SlurmCluster) -> None:
    """Starts the cluster; a bare machine skips (saying what is missing), CI and a broken cluster fail."""
    try:
        cluster.start()
    except (ClusterError, OSError, subprocess.SubprocessError) as error:
        cluster.stop()
        if isinstance(error, ClusterError) and error.prerequisite and not in_ci():
            pytest.skip(f"no SLURM cluster for the tests: {error}; under CI=true this fails")
        pytest.fail(f"could not start a SLURM cluster for the tests: {error}", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    start_or_skip(cluster)
    yield cluster
    cluster.stop()
