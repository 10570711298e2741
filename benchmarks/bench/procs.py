"""Process handling for the benchmark: start pinned, measure CPU/RSS of a process tree, stop by PID.

Everything here is bounded: waits have deadlines, and `Proc.stop()` kills the whole tree it
started (collected by PID from /proc, never by name).
"""
import os
import shutil
import signal
import socket
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
_handed_out = set()


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bind 0, then release)."""
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free port")


def pinning():
    """(proxy_cpu, load_cpu) or (None, None) when fewer than two CPUs are usable."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not shutil.which("taskset"):
        return None, None
    return cpus[0], cpus[1]


def pinned(cmd, cpu):
    if cpu is None:
        return list(cmd)
    return ["taskset", "-c", str(cpu)] + list(cmd)


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(name)[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree_pids(root):
    """root and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu_seconds(root):
    """utime+stime of every live process in the tree plus cutime+cstime (reaped children)."""
    total = 0
    for pid in tree_pids(root):
        try:
            f = _stat_fields(pid)
        except (OSError, IndexError):
            continue
        # fields 14..17 (1-based) = utime stime cutime cstime; rest[0] is field 3
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def tree_rss_bytes(root):
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


class StartError(Exception):
    pass


class Proc:
    """A started child process; output goes to files in `logdir`."""

    def __init__(self, name, cmd, logdir, cpu=None, cwd=None, env=None):
        self.name = name
        self.cmd = pinned(cmd, cpu)
        self.out_path = os.path.join(logdir, f"{name}.out")
        self.err_path = os.path.join(logdir, f"{name}.err")
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.started_at = time.monotonic()
        try:
            self.popen = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err,
                                          stdin=subprocess.DEVNULL, cwd=cwd, env=env)
        except OSError as e:
            self._close_files()
            raise StartError(f"{name}: cannot run {cmd[0]}: {e}") from e
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def cpu_seconds(self):
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self):
        return tree_rss_bytes(self.pid)

    def tail(self, n=1200):
        parts = []
        for p in (self.err_path, self.out_path):
            try:
                with open(p, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - n))
                    txt = f.read().decode("utf-8", "replace").strip()
                if txt:
                    parts.append(txt)
            except OSError:
                pass
        return "\n".join(parts)

    def _close_files(self):
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass

    def stop(self, grace=5.0):
        """SIGTERM the root, wait up to `grace`, then SIGKILL what is left of the tree.

        Descendants are remembered as (pid, start time) before the SIGTERM and only killed if
        /proc still shows the same process, so a recycled PID is never hit.
        """
        try:
            if self.popen.poll() is None:
                kids = [(pid, _start_time(pid)) for pid in tree_pids(self.pid)[1:]]
                try:
                    os.kill(self.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()  # Popen only signals its own, un-reaped child
                    try:
                        self.popen.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                for pid, st in kids:
                    if st is not None and _start_time(pid) == st:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
        finally:
            self._close_files()


def _start_time(pid):
    try:
        return int(_stat_fields(pid)[19])  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return None


def wait_tcp(port, proc=None, timeout=15.0):
    """Wait until 127.0.0.1:port accepts; raise StartError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise StartError(f"{proc.name} exited with code {proc.popen.returncode}: "
                             f"{proc.tail(600)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise StartError(f"{proc.name if proc else 'port'} {port} not accepting after {timeout:.0f}s"
                     + (f": {proc.tail(600)}" if proc else ""))


def run_bounded(cmd, timeout, cpu=None):
    """Run a short command to completion (killed at `timeout`); returns CompletedProcess."""
    return subprocess.run(pinned(cmd, cpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=timeout, text=True)
