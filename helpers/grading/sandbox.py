"""The sandbox one submission's kernel runs in: bubblewrap for isolation, rlimits for resources.

Only the *kernel* (the student's code) is sandboxed. nbgrader, the gradebook and the feedback stay in the
trusted grading process outside, so a submission can neither rewrite its own grade in the database nor touch
anyone else's files. The kernel talks to nbgrader over Unix sockets (ZeroMQ's ``ipc`` transport) in a
folder bound into the sandbox, which works across bubblewrap's private network namespace.

What the kernel sees (``bwrap`` arguments in the order they are applied)::

    --ro-bind / /                   the system, read-only
    --dev /dev --proc /proc         fresh minimal /dev and /proc of its own PID namespace
    --bind PRIVATE/tmp /tmp         a private, writable /tmp (on disk, not RAM), also its $HOME
    --tmpfs H ... --remount-ro H    hidden folders become empty and read-only: /home, /root, $HOME (the
                                    instructor's keys and uploads), the grading folder with every submission,
                                    the solutions, the grading work root
    --ro-bind K K                   kept inside those: the interpreter, the venv, helpers (model caches: --expose)
    --bind RUN CWD                  its own writable working folder, at the path nbgrader executes in
    --bind RUNTIME RUNTIME          the connection file and the kernel's Unix sockets
    --unshare-all                   no network, own PID/IPC/UTS namespaces
    --die-with-parent --new-session killed with the grader; no terminal injection
    --clearenv --setenv ...         none of the instructor's environment (tokens), only what grading needs

and inside, ``prlimit`` caps CPU seconds, address space, file size, processes, open files and core dumps.

Linux does not apply the process limit (RLIMIT_NPROC) to root; :func:`warnings` says so.
Without bubblewrap the kernel still gets the limits and a private working folder, but can read the disk and
use the network; :func:`find_bwrap` explains why it is missing and ``course-grade`` prints it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from traitlets import Dict, Int

GIB = 1024**3
MIB = 1024**2

# Environment variables handed to the kernel; everything else (the instructor's tokens, say) is cleared.
PASS_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH", "HF_HOME", "TORCH_HOME")
PASS_ENV_PREFIXES = ("COURSE_",)
SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "CREDENTIAL")


@dataclass
class Limits:
    """Resource limits for one kernel (and every process it starts, each counted separately)."""

    cpu_seconds: int = 1200
    """RLIMIT_CPU: CPU time of a process; past it the kernel gets SIGXCPU and dies."""
    memory_bytes: int = 4 * GIB
    """RLIMIT_AS: address space of a process; past it allocations raise MemoryError."""
    file_bytes: int = 256 * MIB
    """RLIMIT_FSIZE: largest file it may write; past it writes fail (EFBIG)."""
    processes: int = 256
    """RLIMIT_NPROC: processes and threads of the user (not enforced for root)."""
    open_files: int = 1024
    """RLIMIT_NOFILE: open file descriptors."""

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` under these limits, soft and hard alike (the kernel cannot raise them again).

        With util-linux's ``prlimit`` where there is one (readable in ``ps``), else a few lines of Python that
        call ``resource.setrlimit`` and exec the command (macOS).
        """
        if shutil.which("prlimit"):
            return [
                "prlimit",
                f"--cpu={self.cpu_seconds}",
                f"--as={self.memory_bytes}",
                f"--fsize={self.file_bytes}",
                f"--nproc={self.processes}",
                f"--nofile={self.open_files}",
                "--core=0",
                "--",
                *cmd,
            ]
        limits = {
            "RLIMIT_CPU": self.cpu_seconds,
            "RLIMIT_AS": self.memory_bytes,
            "RLIMIT_FSIZE": self.file_bytes,
            "RLIMIT_NPROC": self.processes,
            "RLIMIT_NOFILE": self.open_files,
            "RLIMIT_CORE": 0,
        }
        return [sys.executable, "-c", _SETRLIMIT, json.dumps(limits), *cmd]


_SETRLIMIT = """import json, os, resource, sys
for name, value in json.loads(sys.argv[1]).items():
    if hasattr(resource, name):
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass  # a limit this system does not let us set
os.execvp(sys.argv[2], sys.argv[2:])
"""


@dataclass
class Sandbox:
    """Everything needed to start one submission's kernel; serialised to JSON for the grading subprocess."""

    private_dir: str
    """Host folder of this submission's sandbox: its /tmp is ``private_dir/tmp``, the kernel's log ``kernel.log``."""
    run_dir: str
    """Host folder the kernel writes in; bound over the folder nbgrader executes the notebook in."""
    runtime_dir: str
    """Host folder of the connection file and the kernel's Unix sockets (keep the path short: sockets allow 107
    characters)."""
    hide: list[str] = field(default_factory=list)
    """Host paths the kernel must not see (folders become empty and read-only, files empty)."""
    keep: list[str] = field(default_factory=list)
    """Host folders inside hidden ones that stay visible, read-only (the interpreter, the packages, caches)."""
    limits: Limits = field(default_factory=Limits)
    use_bwrap: bool = True
    """False: no isolation (bubblewrap missing), limits only."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the kernel."""

    @classmethod
    def from_dict(cls, d: dict) -> Sandbox:
        d = dict(d)
        d["limits"] = Limits(**d.get("limits", {}))
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------------------------------- commands

    def kernel_env(self) -> dict[str, str]:
        """The kernel's whole environment."""
        env = {
            k: v
            for k, v in os.environ.items()
            if (k in PASS_ENV or k.startswith(PASS_ENV_PREFIXES)) and not any(w in k.upper() for w in SECRET_WORDS)
        }
        home = "/tmp" if self.use_bwrap else os.path.join(self.private_dir, "tmp")
        env.update(
            HOME=home,
            TMPDIR=home,
            NBGRADER_EXECUTION="autograde",
            COURSE_PRESET="local",  # the grading preset, whatever the instructor's shell says
            PYTHONDONTWRITEBYTECODE="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            MPLBACKEND="agg",
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.setdefault("COURSE_CACHE", cache_dir())  # the course's models, read-only inside the sandbox
        env.update(self.env)
        return env

    def wrap(self, cmd: list[str], *, cwd: str) -> list[str]:
        """``cmd`` (the kernel's command line) wrapped in bubblewrap and the resource limits."""
        limited = self.limits.wrap(cmd)
        if not self.use_bwrap:
            return limited
        args = [
            "bwrap",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--bind",
            os.path.join(self.private_dir, "tmp"),
            "/tmp",
        ]
        # Hide and re-expose from the outermost path in, so that each deeper rule wins over its ancestors. /tmp is
        # hidden already (it is the private one): only what is kept inside it, and hidden inside that, matters.
        rules = {(os.path.abspath(p), "hide") for p in self.hide} | {(os.path.abspath(p), "keep") for p in self.keep}
        rules = {(p, what) for p, what in rules if os.path.exists(p)}
        hides = [p for p, what in rules if what == "hide"] + ["/tmp"]
        keeps = [p for p, what in rules if what == "keep"]
        hidden_dirs = []
        for path, what in sorted(rules, key=lambda r: (r[0].count("/"), r[0], r[1])):
            if what == "keep":
                if any(_under(path, h) for h in hides):
                    args += ["--ro-bind", path, path]
            elif _under(path, "/tmp") and not any(_under(path, k) for k in keeps):
                continue
            elif os.path.isdir(path):
                args += ["--tmpfs", path]
                hidden_dirs.append(path)
            else:
                args += ["--ro-bind", "/dev/null", path]
        args += ["--bind", self.run_dir, cwd, "--bind", self.runtime_dir, self.runtime_dir]
        for path in hidden_dirs:
            args += ["--remount-ro", path]
        args += ["--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
        for k, v in sorted(self.kernel_env().items()):
            args += ["--setenv", k, v]
        args += ["--chdir", cwd]
        return args + limited


def cache_dir() -> str:
    """The course's artifact cache (helpers.cache), as the grader sees it (its $HOME, not the sandbox's)."""
    from helpers.cache import cache_root

    return str(cache_root().expanduser().resolve())


def needed_paths() -> list[str]:
    """Folders the kernel cannot start without: the interpreter, its packages, this package's root."""
    import site

    import helpers

    paths = {
        sys.prefix,
        sys.base_prefix,
        os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))),
        os.path.dirname(os.path.dirname(os.path.abspath(helpers.__file__))),
    }
    paths |= set(site.getsitepackages()) | ({site.getusersitepackages()} if site.ENABLE_USER_SITE else set())
    return sorted(os.path.abspath(p) for p in paths if os.path.isdir(p))


def check_private(private: list[str], keep: list[str]) -> list[str]:
    """``keep`` without anything inside a private path; an error if the kernel's own files would be hidden."""
    for h in private:
        for n in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
            if _under(os.path.realpath(n), os.path.realpath(h)):
                raise ValueError(
                    f"{h} must be hidden from submissions, but it holds {n}, which their kernel needs; "
                    "keep the grading folder, the uploads and the solutions apart from the virtual "
                    "environment and the package"
                )
    return [k for k in keep if not any(_under(os.path.realpath(k), os.path.realpath(h)) for h in private)]


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.abspath(path), os.path.abspath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


# ------------------------------------------------------------------------------------------- availability


def find_bwrap() -> tuple[bool, str]:
    """Whether bubblewrap can make a sandbox here, and a sentence saying so (or why not, and what to do)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return False, (
            "bubblewrap is not installed, so submissions run WITHOUT a sandbox: they can read your files "
            "and use the network (resource limits still apply). Install it: sudo apt-get install bubblewrap"
        )
    probe = [
        exe,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--unshare-all",
        "--die-with-parent",
        "true",
    ]
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap ({exe}) could not be started: {e}"
    if r.returncode != 0:
        return False, (
            f"bubblewrap ({exe}) is installed but cannot create a sandbox here: {r.stderr.strip()}. "
            "Unprivileged user namespaces may be disabled (on Ubuntu 24.04: "
            "sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0), or run inside a VM rather "
            "than an unprivileged container"
        )
    return True, f"sandbox: {exe} (read-only system, private folder, no network)"


def warnings(sandbox_ok: bool, why: str) -> list[str]:
    """Sentences for the instructor about what this machine's sandbox does not cover."""
    out = [] if sandbox_ok else [why]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        out.append(
            "running as root: Linux does not apply the process limit (RLIMIT_NPROC) to root, so a fork "
            "bomb is stopped only by the timeouts; grade as a normal user to enforce it"
        )
    return out


# ------------------------------------------------------------------------------------------ kernel manager


class LimitedIOPubClient(AsyncKernelClient):
    """A kernel client that refuses single messages larger than ``max_message_bytes`` on IOPub.

    A submission that prints a gigabyte in one call would otherwise make the grader hold that gigabyte (and
    its JSON copy) in memory. ZeroMQ drops the oversized message; the cell then ends with an IOPub timeout,
    which the grader reports as output too large.
    """

    max_message_bytes = Int(64 * MIB, config=True)

    def connect_iopub(self, identity=None):
        import zmq

        url = self._make_url("iopub")
        sock = self.context.socket(zmq.SUB)
        sock.linger = 1000
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if identity:
            sock.identity = identity
        sock.connect(url)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        return sock


class SandboxedKernelManager(AsyncKernelManager):
    """An AsyncKernelManager that starts the kernel inside :class:`Sandbox` and talks to it over Unix sockets."""

    sandbox = Dict(help="Sandbox.to_dict() of the submission being graded").tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transport = "ipc"
        self.client_class = "helpers.grading.sandbox.LimitedIOPubClient"
        self.client_factory = LimitedIOPubClient
        self._box = Sandbox.from_dict(self.sandbox)
        self._cwd: str | None = None

    async def _async_pre_start_kernel(self, **kw):
        # The kernel works in a copy of the folder nbgrader executes in (the notebook, the assignment's files):
        # it can write there freely without being able to touch, or plant links in, what nbgrader writes.
        self._cwd = os.path.abspath(kw.get("cwd") or os.getcwd())
        if os.path.exists(self._box.run_dir):
            shutil.rmtree(self._box.run_dir)
        shutil.copytree(self._cwd, self._box.run_dir, symlinks=True)
        os.makedirs(os.path.join(self._box.private_dir, "tmp"), exist_ok=True)
        os.makedirs(self._box.runtime_dir, exist_ok=True)
        # Unix sockets named after the connection file, in a folder bound into the sandbox at the same path.
        self.kernel_id = self.kernel_id or str(uuid.uuid4())
        self.connection_file = os.path.join(self._box.runtime_dir, f"kernel-{self.kernel_id[:8]}.json")
        self.ip = self.connection_file[: -len(".json")] + "-ipc"
        kw["env"] = self._box.kernel_env()
        # The kernel process's own stdout/stderr (not cell output): kept for the log, bounded by the file-size limit.
        self._log = open(os.path.join(self._box.private_dir, "kernel.log"), "ab")
        kw["stdout"] = kw["stderr"] = self._log
        if self._box.use_bwrap:
            kw["cwd"] = self._cwd  # bwrap binds run_dir there
        else:
            kw["cwd"] = self._box.run_dir
        return await super()._async_pre_start_kernel(**kw)

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        try:
            await super()._async_launch_kernel(kernel_cmd, **kw)
        finally:
            self._log.close()

    def format_kernel_cmd(self, extra_arguments=None):
        cmd = super().format_kernel_cmd(extra_arguments)
        cwd = self._cwd if self._box.use_bwrap else self._box.run_dir
        return self._box.wrap(cmd, cwd=cwd)

    @property
    def kernel_spec(self):
        # Always this interpreter's ipykernel, whatever kernelspecs the machine has installed; interrupts are sent
        # as messages, because a signal would reach bwrap rather than the kernel inside it.
        if self._kernel_spec is None:
            self._kernel_spec = KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (sandboxed)",
                language="python",
                interrupt_mode="message",
                metadata={},
            )
        return self._kernel_spec
