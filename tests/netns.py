"""Network namespaces for tests: a pod-like sandbox with real interfaces, addresses and iptables.

    from tests.netns import netns_env          # pytest fixture (import it in your test module)

    def test_x(netns_env):
        pod = netns_env.netns("pod")           # fresh namespace, lo up
        peer = netns_env.netns("peer")
        pod_ip, peer_ip = netns_env.veth(pod, peer)      # addresses in 198.18.0.0/15
        pod.run(["iptables-save"])              # CompletedProcess (text), check=True by default
        srv = netns_env.spawn(pod, ["python3", "-c", CODE], uid=1337)   # Popen, killed at the end
        ...

Or without pytest: `with NetnsEnv() as env: ...`. Everything created (namespaces, host-side veth
links, processes) is removed when the environment closes, even after a failure; processes are
killed by PID (their own process group). `require_netns()` skips the calling test (pytest.skip)
when not root or when `ip netns` cannot create a namespace here.

Only addresses from 198.18.0.0/15 (RFC 2544 benchmarking range) are handed out. Each environment
takes /30 subnets from a block chosen by its PID, so parallel test processes don't collide on
host-side links.
"""

import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import uuid

import pytest

TEST_NET = ipaddress.ip_network("198.18.0.0/15")
# held by the compose mesh (docker-compose.yml) and the test dockerd's bridge (scripts/local_dockerd.py)
RESERVED = (ipaddress.ip_network("198.18.10.0/24"), ipaddress.ip_network("198.19.254.0/24"))
CMD_TIMEOUT = 20

_probe_result = None


def netns_unavailable_reason():
    """None when namespaces can be used here, else why not (cached)."""
    global _probe_result
    if _probe_result is not None:
        return _probe_result or None
    reason = ""
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, iptables)"
    elif not shutil.which("ip"):
        reason = "iproute2 'ip' not found"
    else:
        name = f"pxprobe{os.getpid()}"
        p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                           timeout=CMD_TIMEOUT)
        if p.returncode != 0:
            reason = f"ip netns add failed: {p.stderr.strip()}"
        else:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=CMD_TIMEOUT)
    _probe_result = reason
    return reason or None


def require_netns():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _run(argv, check=True, timeout=CMD_TIMEOUT, input=None):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


class NetNS:
    """One named network namespace."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"NetNS({self.name})"

    def argv(self, argv, uid=None, gid=None):
        """Command line that runs argv inside the namespace, optionally as uid/gid (setpriv)."""
        prefix = ["ip", "netns", "exec", self.name]
        if uid is not None or gid is not None:
            uid = 0 if uid is None else uid
            gid = uid if gid is None else gid
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        return prefix + list(argv)

    def run(self, argv, check=True, timeout=CMD_TIMEOUT, input=None, uid=None, gid=None):
        """Run to completion inside the namespace; returns CompletedProcess (text mode)."""
        return _run(self.argv(argv, uid, gid), check=check, timeout=timeout, input=input)

    def ip(self, *args, check=True):
        return self.run(["ip"] + [str(a) for a in args], check=check)


class NetnsEnv:
    """Creates namespaces / veth pairs / processes and removes all of them on close()."""

    def __init__(self, prefix="pxt"):
        self._tag = f"{prefix}{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
        self._count = itertools.count()
        self.namespaces = []
        self.host_links = []
        self.procs = []
        # 2**15 /30 subnets in 198.18.0.0/15; pick a block of 64 by PID, then walk it.
        # A block that touches RESERVED is swapped for the block half the range away.
        def block(b):
            return ipaddress.ip_network((int(TEST_NET.network_address) + 4 * 64 * b, 24))
        b = os.getpid() % 512
        if any(block(b).overlaps(r) for r in RESERVED):
            b = (b + 256) % 512
        self._subnets = (ipaddress.ip_network((int(TEST_NET.network_address) + 4 * (b * 64 + i), 30))
                         for i in range(64))
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _name(self, hint):
        return f"{self._tag}{hint[:6]}{next(self._count)}"

    def netns(self, hint="ns"):
        """A fresh namespace with lo up."""
        ns = NetNS(self._name(hint))
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def subnet(self):
        """The next unused /30 in 198.18.0.0/15."""
        try:
            return next(self._subnets)
        except StopIteration:
            raise RuntimeError("out of test subnets") from None

    def veth(self, a, b=None, subnet=None):
        """Connect namespace a with namespace b (None: the host) by a veth pair with a /30 from
        198.18.0.0/15 (or the given ip_network). Returns (addr_a, addr_b) as strings; the
        interface names are in .last_veth = (name_a, name_b)."""
        net = subnet or self.subnet()
        hosts = list(net.hosts())
        addr_a, addr_b = str(hosts[0]), str(hosts[1])
        n = next(self._count)
        # IFNAMSIZ is 16: keep names short and unique per environment.
        if_a, if_b = f"vx{os.getpid() % 10000}{n}a", f"vx{os.getpid() % 10000}{n}b"
        _run(["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b])
        self.host_links.append(if_a)  # deleted on close if still on the host
        _run(["ip", "link", "set", if_a, "netns", a.name])
        if b is not None:
            _run(["ip", "link", "set", if_b, "netns", b.name])
        a.ip("addr", "add", f"{addr_a}/{net.prefixlen}", "dev", if_a)
        a.ip("link", "set", if_a, "up")
        if b is not None:
            b.ip("addr", "add", f"{addr_b}/{net.prefixlen}", "dev", if_b)
            b.ip("link", "set", if_b, "up")
        else:
            _run(["ip", "addr", "add", f"{addr_b}/{net.prefixlen}", "dev", if_b])
            _run(["ip", "link", "set", if_b, "up"])
            self.host_links.append(if_b)
        self.last_veth = (if_a, if_b)
        return addr_a, addr_b

    def spawn(self, ns, argv, uid=None, gid=None, **popen_kw):
        """Start argv in the background inside ns (as uid/gid if given). Returns the Popen; it is
        killed (SIGKILL to its process group, by PID) when the environment closes."""
        popen_kw.setdefault("stdout", subprocess.PIPE)
        popen_kw.setdefault("stderr", subprocess.PIPE)
        popen_kw.setdefault("text", True)
        p = subprocess.Popen(ns.argv(argv, uid, gid), start_new_session=True, **popen_kw)
        self.procs.append(p)
        return p

    def kill(self, proc):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass

    def close(self):
        if self._closed:
            return
        self._closed = True
        for p in self.procs:
            self.kill(p)
        for link in self.host_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=CMD_TIMEOUT)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=CMD_TIMEOUT)


def wait_for_line(proc, timeout=5.0):
    """First line a spawned process writes on stdout (e.g. a 'ready' line), or raise."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"no output from pid {proc.pid} within {timeout}s")
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.poll() is not None else ""
            raise RuntimeError(f"pid {proc.pid} exited ({proc.poll()}): {err.strip()}")
        return line.rstrip("\n")
    finally:
        sel.close()


@pytest.fixture
def netns_env():
    """A NetnsEnv that is closed after the test; skips when namespaces are unavailable."""
    require_netns()
    env = NetnsEnv()
    try:
        yield env
    finally:
        env.close()
