"""A one-node SLURM cluster on this host, from a fresh state folder: munged, slurmctld and slurmd.

Used by tests/test_slurm.py; also runnable by hand (as root) to try the slurm profile:

    python tests/slurm/local_slurm.py start /tmp/slurm    # prints: export SLURM_CONF=/tmp/slurm/etc/slurm.conf
    python tests/slurm/local_slurm.py stop /tmp/slurm

The daemons run in the foreground as children of this process, in sessions of their own (their pids in
<root>/run/*.fg.pid, which `stop` uses), log to <root>/log/, and talk through their own MUNGE socket and free
TCP ports, so a host's own MUNGE is left alone. While the cluster runs, /etc/slurm/slurm.conf links to its
slurm.conf (see DEFAULT_CONF); a host with a slurm.conf of its own is refused. The node declares `gpus` GPUs backed by dummy device
files and (with SlurmdParameters=config_overrides) the given CPUs and memory, whatever the host has.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
# Where SLURM's commands look when SLURM_CONF is not set. The slurm-jobstep plugin (0.6.1) drops every
# SLURM_* variable, SLURM_CONF included, before its `srun` inside a job, so on this test cluster, as on a
# real one, slurm.conf must be found there: it becomes a link to this cluster's file while it runs.
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")
CLUSTER_NAME = "ClusterName=vlmtest"
DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")


def missing_binaries() -> list[str]:
    """The SLURM/MUNGE programs that are not on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    return [name for name in (*DAEMONS, "mungekey", *COMMANDS) if shutil.which(name, path=path) is None]


def _which(name: str) -> str:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise FileNotFoundError(f"{name} not found (install Debian's slurm-wlm and munge: .ci/slurm-setup.sh)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class SlurmStartError(RuntimeError):
    pass


@dataclass
class LocalSlurm:
    """One node named after this host, one default partition, `gpus` GPUs of type `gpu_type`."""

    root: Path
    partition: str = "debug"
    cpus: int = 16
    memory_mb: int = 128_000
    def_mem_per_cpu: int = 1000
    gpus: int = 2
    gpu_type: str = "testgpu"
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ----------------------------------------------------------------- paths and environment
    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose SLURM commands (sbatch, squeue, ...) talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "SBATCH_", "SQUEUE_"))]:
            del env[key]  # never inherit another job's identity or defaults
        return env

    def log(self, name: str) -> Path:
        return self.root / "log" / f"{name}.log"

    # ----------------------------------------------------------------- configuration
    def _gpu_devices(self) -> list[str]:
        """Character devices for gres.conf (mknod, as root); /dev/null and /dev/zero where mknod fails."""
        devices = []
        for i in range(self.gpus):
            path = self.root / "dev" / f"testgpu{i}"
            try:
                os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
                devices.append(str(path))
            except OSError:
                devices = []
                break
        if not devices:
            fallback = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
            if self.gpus > len(fallback):
                raise SlurmStartError(f"mknod failed and only {len(fallback)} fallback devices exist")
            devices = fallback[: self.gpus]
        return devices

    def write_config(self) -> None:
        for sub in ("etc", "munge", "state", "spool/slurmd", "run", "log", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        ctld_port, slurmd_port = _free_ports(2)
        values = {
            "root": str(self.root),
            "hostname": self.hostname,
            "ctld_port": ctld_port,
            "slurmd_port": slurmd_port,
            "munge_socket": str(self.munge_socket),
            "def_mem_per_cpu": self.def_mem_per_cpu,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "gpus": self.gpus,
            "gpu_type": self.gpu_type,
            "partition": self.partition,
            "gpu_lines": "\n".join(
                f"NodeName={self.hostname} Name=gpu Type={self.gpu_type} File={device}"
                for device in self._gpu_devices()
            ),
        }
        for name in ("slurm.conf", "gres.conf", "cgroup.conf"):
            text = Template((HERE / f"{name}.in").read_text()).substitute(values)
            (self.root / "etc" / name).write_text(text)

    def _link_default_conf(self) -> None:
        link = DEFAULT_CONF
        if link.is_symlink() or link.exists():
            target = link.resolve()
            ours = target.is_file() and CLUSTER_NAME in target.read_text(errors="replace")
            if link.exists() and not ours:
                raise SlurmStartError(
                    f"{link} exists: this host has its own SLURM configuration; run the test cluster elsewhere"
                )
            link.unlink()  # a link left by an earlier test cluster
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(self.conf)

    def _unlink_default_conf(self) -> None:
        link = DEFAULT_CONF
        if link.is_symlink() and Path(os.readlink(link)) == self.conf:
            link.unlink()

    # ----------------------------------------------------------------- daemons
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log(f"{name}.stdout"), "ab")
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,  # a Ctrl-C in the test's terminal does not reach the daemons
            close_fds=True,
        )
        out.close()
        self.processes[name] = process
        (self.root / "run" / f"{name}.fg.pid").write_text(str(process.pid))

    def _wait(self, what: str, check, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmStartError(
                        f"{name} exited with {process.returncode} while waiting for {what}\n{self.logs()}"
                    )
            if check():
                return
            time.sleep(0.3)
        raise SlurmStartError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _run(self, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env(), timeout=timeout)

    def start(self, timeout: float = 90) -> LocalSlurm:
        """Write the configuration, start munged, slurmctld and slurmd, and wait until the node is idle.

        On failure, whatever was started is stopped again before the error is raised."""
        if self.root.exists() and any(self.root.iterdir()):
            raise SlurmStartError(f"{self.root} is not empty: a fresh state folder is needed")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> LocalSlurm:
        self.write_config()
        self._link_default_conf()
        key = self.root / "munge" / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--log-file={self.log('munged')}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait("the MUNGE socket", self.munge_socket.exists, timeout=30)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", self._controller_up, timeout=timeout)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname])
        self._wait(f"node {self.hostname} to be idle", self.node_idle, timeout=timeout)
        return self

    def _controller_up(self) -> bool:
        try:
            return " is UP" in self._run("scontrol", "ping", timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False

    def node_state(self) -> str:
        try:
            result = self._run("sinfo", "--noheader", "--Node", "--format=%T", timeout=10)
        except subprocess.TimeoutExpired:
            return ""
        return result.stdout.strip().lower() if result.returncode == 0 else ""

    def node_idle(self) -> bool:
        state = self.node_state()
        if "drain" in state or state in ("down", "inval", "invalid"):
            reason = self._run("scontrol", "show", "node", self.hostname).stdout
            raise SlurmStartError(f"node {self.hostname} is {state}:\n{reason}\n{self.logs()}")
        return state == "idle"

    def show_jobs(self) -> list[dict[str, str]]:
        """`scontrol -d show job` of every job slurmctld still holds (finished ones for MinJobAge), as dicts."""
        result = self._run("scontrol", "--details", "--oneliner", "show", "job")
        jobs = []
        for line in result.stdout.splitlines():
            if "JobId=" not in line:
                continue
            record: dict[str, str] = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    record[key] = value
            jobs.append(record)
        return jobs

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*.log")) if (self.root / "log").exists() else []:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self, timeout: float = 20) -> None:
        """Cancel what is left, shut the daemons down (slurmd, slurmctld, munged) and wait for them."""
        pids = dict(self._pids())
        if "slurmctld" in pids and _alive(pids["slurmctld"]):
            try:
                self._run("scancel", "--full", "--user", str(os.getuid()), timeout=10)
            except (subprocess.TimeoutExpired, FileNotFoundError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            pid = pids.get(name)
            if pid is None or not _alive(pid):
                continue
            _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                self._reap(name)
                time.sleep(0.2)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
            self._reap(name, block=True)
        self._kill_stray_steps()
        self._unlink_default_conf()

    def _pids(self):
        for name in DAEMONS:
            if name in self.processes:
                yield name, self.processes[name].pid
            else:
                pidfile = self.root / "run" / f"{name}.fg.pid"
                if pidfile.exists():
                    yield name, int(pidfile.read_text())

    def _reap(self, name: str, block: bool = False) -> None:
        process = self.processes.get(name)
        if process is not None:
            try:
                process.wait(timeout=5 if block else 0.01)
            except subprocess.TimeoutExpired:
                pass

    def _kill_stray_steps(self) -> None:
        """slurmstepd processes of this cluster (their command line names our spool folder)."""
        spool = str(self.root / "spool")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "slurmstepd" in cmdline and (spool in cmdline or f"SLURM_CONF={self.conf}" in environ):
                _signal(int(proc.name), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]).resolve())
    if argv[0] == "start":
        cluster.start()
        print(json.dumps({"SLURM_CONF": str(cluster.conf), "logs": str(cluster.root / "log")}), file=sys.stderr)
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
