"""A dockerd of one's own, for the compose test and the mesh benchmark on machines where none runs.

    d = LocalDockerd.start()      # own data root, exec root, socket, pidfile, bridge 198.19.254.1/24
    env = dict(os.environ, DOCKER_HOST=d.host)
    ...
    d.stop()                      # SIGTERM by PID (SIGKILL to its group after 45 s), then removes
                                  # its mounts, directories and the docker0 bridge it created

It never touches the host's iptables (--iptables=false): containers reach each other and the host
over their bridge, and docker's embedded DNS still works; there is no NAT to the outside.
`docker_answers(env)` tells whether a daemon already answers on DOCKER_HOST / the default socket.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

BIP = "198.19.254.1/24"        # RFC 2544 benchmarking range, as every test address here


def docker_answers(env, docker="docker", timeout=30) -> bool:
    try:
        p = subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], env=env, capture_output=True,
                           text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


class LocalDockerd:
    def __init__(self, exe="dockerd", bip=BIP):
        self.data = tempfile.mkdtemp(prefix="pyproxy-dockerd-", dir="/var/tmp")   # overlay2 needs a real fs
        self.run = tempfile.mkdtemp(prefix="pxd", dir="/run")                    # short: unix socket paths
        self.sock = os.path.join(self.run, "docker.sock")
        self.log_path = os.path.join(self.data, "dockerd.log")
        self.had_docker0 = os.path.exists("/sys/class/net/docker0")
        argv = [shutil.which(exe) or exe, "--data-root", os.path.join(self.data, "root"),
                "--exec-root", os.path.join(self.run, "exec"), "--pidfile", os.path.join(self.run, "dockerd.pid"),
                "-H", "unix://" + self.sock, "--bip", bip, "--iptables=false", "--log-level", "warn"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def start(cls, docker="docker", timeout=60.0, **kw) -> "LocalDockerd":
        d = cls(**kw)
        try:
            d.wait(docker, timeout)
        except BaseException:
            d.stop()
            raise
        return d

    @property
    def host(self) -> str:
        return "unix://" + self.sock

    def wait(self, docker="docker", timeout=60.0):
        env = dict(os.environ, DOCKER_HOST=self.host)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if docker_answers(env, docker, timeout=20):
                return
            time.sleep(0.5)
        raise RuntimeError("dockerd did not come up:\n" + self.tail())

    def tail(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
        for m in sorted((m for m in mounts if m.startswith(self.data) or m.startswith(self.run)), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=20)
        if not self.had_docker0 and os.path.exists("/sys/class/net/docker0"):
            subprocess.run(["ip", "link", "del", "docker0"], capture_output=True, timeout=20)
        shutil.rmtree(self.data, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)
