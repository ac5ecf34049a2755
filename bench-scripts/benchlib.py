"""What the benchmark scripts share: building the binaries, the peers' venvs, the study's
dataset and published points, starting and stopping processes (each in its own session,
logged), waiting for servers, guarding ports, and reading CPU and memory from /proc.

Everything listens on 127.0.0.1. Used by sweep.py (the side-by-side benchmark) and
fidelity.py (the simulator against the study's published points).
"""

import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
VENV = ROOT / "target" / "bench-venv"
RAY_VENV = ROOT / "target" / "ray-venv"
VLLM_ROUTER_VERSION = "0.1.17"
RAY_VERSION = "2.60.0"
STUDY_POINTS = ROOT / "bench-scripts" / "study_points.json"


def logger(prefix):
    def log(*parts):
        print(f"[{prefix}]", *parts, file=sys.stderr, flush=True)
    return log


def build(log, dry=False):
    cmd = ["cargo", "build", "--release", "--bin", "router", "--bin", "vllm-sim", "--bin", "llm-bench"]
    log("$", " ".join(cmd))
    if not dry:
        subprocess.run(cmd, cwd=ROOT, check=True)


def vllm_router_bin(log, dry=False):
    """vllm-router from PyPI, pinned, in a venv under target/."""
    binary = VENV / "bin" / "vllm-router"
    if dry or binary.exists():
        return binary
    log(f"installing vllm-router=={VLLM_ROUTER_VERSION} into {VENV}")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", f"vllm-router=={VLLM_ROUTER_VERSION}"], check=True)
    return binary


def haproxy_bin(log, dry=False):
    """HAProxy from Debian's packages (`apt-get install haproxy`, 2.6 on bookworm)."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if dry or found:
        return found or "haproxy"
    log("installing haproxy with apt-get")
    subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_config(path, port, urls, session_header=None, extra_binds=()):
    """An HAProxy configuration in HTTP mode in front of `urls`: keep-alive to the
    engines (connections reused across clients), round robin, or consistent hashing on
    `session_header` when given, and `option http-no-delay` so that each event is sent
    when it is read (by default HAProxy lets the kernel merge small sends, which held SSE
    events back: +28 ms TTFT and 34 ms p99 ITL on the decode-heavy sweep; Ray Serve LLM
    sets TCP_NODELAY on its HAProxy too). Written to `path`; returns the command that
    runs it in the foreground."""
    servers = "\n".join(
        f"    server e{i} {url.removeprefix('http://')} maxconn 10000" for i, url in enumerate(urls)
    )
    balance = (f"    balance hdr({session_header})\n    hash-type consistent\n" if session_header
               else "    balance roundrobin\n")
    extra = "".join(f"frontend extra{i}\n    bind {bind}\n    default_backend engines\n"
                    for i, bind in enumerate(extra_binds))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"""global
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    option http-no-delay
    http-reuse always
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 60s
frontend ingress
    bind 127.0.0.1:{port}
    default_backend engines
{extra}backend engines
{balance}{servers}
""")
    return ["-f", str(path), "-db"]


def ray_python(log, dry=False):
    """Ray Serve LLM from PyPI, pinned, in a venv under target/ (about 9 GB with vLLM and torch)."""
    python = RAY_VENV / "bin" / "python"
    if dry or (RAY_VENV / "bin" / "serve").exists():
        return python
    log(f"installing ray[serve,llm]=={RAY_VERSION} into {RAY_VENV} (about 9 GB)")
    subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
    subprocess.run([str(RAY_VENV / "bin" / "pip"), "install", "-q", f"ray[serve,llm]=={RAY_VERSION}"], check=True)
    return python


def agentic_dataset(log, dry=False):
    """The study's agentic dataset (AIPerf 0.8.0), checked against its sha256."""
    cmd = ["bash", ROOT / "bench-scripts" / "agentic_dataset.sh"]
    log("$", " ".join(map(str, cmd)))
    if dry:
        return ROOT / "target" / "bench-data" / "agentic_loop_2200s_seed42" / "dataset.jsonl"
    return Path(subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout.strip())


def study_points():
    """The study's published points (bench-scripts/study_points.json), by (workload, c, stack)."""
    data = json.loads(STUDY_POINTS.read_text())
    return {(p["workload"], p["concurrency"], p["stack"]): p for p in data["points"]}


class Processes:
    """Processes started for one run, each in its own session with its output in a log."""

    def __init__(self, logs, log, dry=False):
        self.logs = Path(logs)
        self.log = log
        self.dry = dry
        self.procs = []

    def spawn(self, cmd, name, env=None):
        self.log("$", " ".join(shlex.quote(str(c)) for c in cmd))
        if self.dry:
            return None
        self.logs.mkdir(parents=True, exist_ok=True)
        logfile = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc):
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def stop_all(self):
        sessions = [p.pid for p in self.procs]
        for proc in self.procs:
            self.stop(proc)
        # Each process was started in its own session; some of their children outlive
        # their parents (Ray's GCS and raylet, HAProxy after a reload): kill the rest of
        # each session.
        for pid in sum((session_members(s) for s in sessions), []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []

    def pids(self):
        return [p.pid for p in self.procs]

    def wait_ready(self, url, model, what, timeout=120):
        """Wait until GET url answers 200 naming `model`."""
        if self.dry:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200 and model.encode() in r.read():
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{what} not ready at {url} after {timeout}s")

    def ensure_free(self, ports, timeout=60):
        """Wait for our ports to be free: a listener left over would answer in the
        contender's place. Leftovers of our own binaries (under target/, e.g. an HAProxy
        of Ray's still draining) are killed; anything else is an error."""
        if self.dry:
            return
        deadline = time.time() + timeout
        while True:
            busy = [p for p in ports if port_in_use(p)]
            if not busy:
                return
            for port in busy:
                pid = listener_pid(port)
                try:
                    ours = pid is not None and os.readlink(f"/proc/{pid}/exe").startswith(str(ROOT / "target"))
                except OSError:
                    ours = False
                if ours:
                    os.kill(pid, signal.SIGKILL)
            if time.time() > deadline:
                raise RuntimeError(f"ports {busy} are in use by another process; stop it first")
            time.sleep(1)


# ---- /proc ----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid):
    """(user, system) CPU seconds of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / TICK, int(fields[12]) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def peak_rss_kb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def session_members(sid):
    """Every process of the session `sid` (the contender and all it started, including
    children whose parents have exited)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    members.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return members


def port_in_use(port):
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def listener_pid(port):
    """The pid listening on 127.0.0.1:port, from /proc (socket inode to process)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inode = fields[9]
    if inode is None:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(entry.name)
        except OSError:
            continue
    return None


def machine_ticks():
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields


def busy_fraction(a, b):
    d = [y - x for x, y in zip(a, b)]
    total = sum(d)
    idle = d[3] + d[4]
    return 1 - idle / total if total else 0.0


def machine_info():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions():
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    return {"rustc": out(["rustc", "--version"]), "router": out([str(BIN / "router"), "--version"]),
            "vllm-sim": out([str(BIN / "vllm-sim"), "--version"]),
            "vllm-router": VLLM_ROUTER_VERSION, "llm-bench": out([str(BIN / "llm-bench"), "--version"])}


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None
