"""init/istio-iptables: rule sets against Istio's golden files, real installs in network
namespaces, clean-up, bad input, and real traffic capture (SO_ORIGINAL_DST, TPROXY)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.netns import netns_env, require_netns, wait_for_line  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "init", "istio-iptables")

# Istio's injected istio-init command line (sidecar injection template).
INJECTED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
            "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]


def dry_run(*flags, env=None):
    p = subprocess.run([sys.executable, TOOL, "--dry-run", *flags], capture_output=True, text=True,
                       timeout=20, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


def sections(out):
    """Dry-run output -> {'iptables': text, 'ip6tables': text, 'ip': [commands]}."""
    res = {"iptables": "", "ip6tables": "", "ip": []}
    cur = None
    for line in out.splitlines(keepends=True):
        if line.startswith("# iptables-restore"):
            cur = "iptables"
        elif line.startswith("# ip6tables-restore"):
            cur = "ip6tables"
        elif line.startswith("# ip "):
            res["ip"].append(line[2:].strip())
        else:
            res[cur] += line
    return res


# ---------------------------------------------------------------------------------------------
# Expected rule sets: Istio's golden files (tools/istio-iptables/pkg/capture/testdata) and the
# contract (ISTIO_CONTRACT.md section 7), written out in iptables-restore form.
# ---------------------------------------------------------------------------------------------

# The head of every nat table: Istio's chains and the redirect targets.
NAT_HEAD = """\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""

# The owner/loopback block every configuration shares (IPv4), as in Istio's goldens.
OWNER_V4 = """\
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
"""


def v6(rules: str) -> str:
    """The IPv6 form of IPv4 rules: Istio's goldens differ only in the loopback addresses."""
    return rules.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")


INJECTED_V4 = NAT_HEAD + """\
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
""" + OWNER_V4 + """\
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""

INJECTED_V6 = v6(INJECTED_V4)

# golden ipnets: -i 10.0.0.0/8 (only that range captured outbound, no inbound capture)
IPNETS_V4 = NAT_HEAD + OWNER_V4 + "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT\nCOMMIT\n"

# golden ipnets-with-kube-virt-interfaces: -k eth1,eth2 -i 10.0.0.0/8
IPNETS_KUBEVIRT_V4 = NAT_HEAD.replace(
    "-A ISTIO_INBOUND -p tcp --dport 15008",
    "-I PREROUTING 1 -i eth1 -j RETURN\n-I PREROUTING 1 -i eth2 -j RETURN\n"
    "-A ISTIO_INBOUND -p tcp --dport 15008") + OWNER_V4 + """\
-I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT
-I PREROUTING 1 -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT
COMMIT
"""

# golden inbound-ports-include: -b 32000,31000
INBOUND_PORTS_V4 = NAT_HEAD + """\
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT
-A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT
""" + OWNER_V4 + "COMMIT\n"

# golden outbound-ports-exclude-single (per port: a tcp and a udp RETURN before the owner rules)
OUTBOUND_EXCLUDE_V4 = NAT_HEAD + """\
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 22 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 3306 -j RETURN
""" + OWNER_V4.replace("-A OUTPUT -j ISTIO_OUTPUT\n", "") + "COMMIT\n"

# golden outbound-ports-include: -q 32000,31000
OUTBOUND_PORTS_V4 = NAT_HEAD + OWNER_V4 + """\
-A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT
COMMIT
"""

# golden inbound-ports-wildcard-tproxy: -b '*' -m TPROXY
TPROXY_V4_MANGLE = """\
* mangle
-N ISTIO_DIVERT
-N ISTIO_TPROXY
-N ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN
-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN
-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN
COMMIT
"""

TPROXY_V4 = TPROXY_V4_MANGLE + NAT_HEAD + OWNER_V4 + "COMMIT\n"

TPROXY_V6_MANGLE = v6(TPROXY_V4_MANGLE)


def test_dry_run_injected_flags_match_istio():
    s = sections(dry_run(*INJECTED))
    assert s["iptables"] == INJECTED_V4
    assert s["ip6tables"] == INJECTED_V6
    assert s["ip"] == []


def test_dry_run_long_flags_same_as_short():
    long_flags = ["--envoy-port=15001", "--inbound-capture-port", "15006", "--proxy-uid", "1337",
                  "--proxy-gid=1337", "--istio-inbound-interception-mode", "REDIRECT",
                  "--istio-service-cidr", "*", "--istio-service-exclude-cidr=",
                  "--istio-inbound-ports", "*", "--istio-local-exclude-ports", "15090,15021,15020",
                  "--log_output_level=default:info"]
    assert dry_run(*long_flags) == dry_run(*INJECTED)


def test_dry_run_exclude_cidrs():
    s = sections(dry_run(*INJECTED[:-6], "-x", "198.18.0.0/15,2001:db8::/32, 10.1.2.3/32",
                         "-b", "*", "-d", "15090,15021,15020"))
    assert s["iptables"] == INJECTED_V4.replace(
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
        "-A ISTIO_OUTPUT -d 198.18.0.0/15 -j RETURN\n-A ISTIO_OUTPUT -d 10.1.2.3/32 -j RETURN\n"
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n")
    assert s["ip6tables"] == INJECTED_V6.replace(
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n",
        "-A ISTIO_OUTPUT -d 2001:db8::/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n")


def test_dry_run_include_cidrs():
    assert sections(dry_run("-i", "10.0.0.0/8"))["iptables"] == IPNETS_V4
    assert sections(dry_run("-k", "eth1,eth2", "-i", "10.0.0.0/8"))["iptables"] == IPNETS_KUBEVIRT_V4
    # An IPv6-only include list: IPv4 gets no ISTIO_REDIRECT jump at all.
    s = sections(dry_run("-i", "2001:db8::/32"))
    assert "ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT" in s["ip6tables"]
    assert "-j ISTIO_REDIRECT" not in s["iptables"]


def test_dry_run_include_inbound_ports():
    s = sections(dry_run("-b", "32000,31000", "-d", "15090"))  # -d only applies with -b '*'
    assert s["iptables"] == INBOUND_PORTS_V4


def test_dry_run_outbound_ports():
    assert sections(dry_run("-o", "22,3306"))["iptables"] == OUTBOUND_EXCLUDE_V4
    assert sections(dry_run("-q", "32000,31000"))["iptables"] == OUTBOUND_PORTS_V4


def test_dry_run_tproxy():
    s = sections(dry_run("-b", "*", "-m", "TPROXY"))
    assert s["iptables"] == TPROXY_V4
    assert s["ip6tables"].startswith(TPROXY_V6_MANGLE)
    assert s["ip"] == ["ip -4 rule add fwmark 1337 lookup 133",
                       "ip -4 route add local 0.0.0.0/0 dev lo table 133",
                       "ip -6 rule add fwmark 1337 lookup 133",
                       "ip -6 route add local ::/0 dev lo table 133"]


def test_dry_run_ids_ports_and_mark():
    out = dry_run("-p", "16001", "-z", "16006", "-e", "16008", "-u", "3,4", "-g", "1", "-i", "*",
                  "-b", "*", "-m", "TPROXY", "-t", "77", "-r", "99", "--ipv6=off")
    s = sections(out)
    assert s["ip6tables"] == ""
    v4 = s["iptables"]
    for line in ("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
                 "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 77/0xffffffff --on-port 16006",
                 "-A ISTIO_INBOUND -p tcp --dport 16008 -j RETURN",
                 "-A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN",
                 "-A ISTIO_OUTPUT -m owner --uid-owner 4 -j RETURN",
                 "-A ISTIO_OUTPUT -m owner --gid-owner 1 -j RETURN",
                 "-A ISTIO_DIVERT -j MARK --set-mark 77"):
        assert line in v4.splitlines()
    assert "--gid-owner 1337" not in v4 and "--uid-owner 1337" not in v4
    assert s["ip"] == ["ip -4 rule add fwmark 77 lookup 99",
                       "ip -4 route add local 0.0.0.0/0 dev lo table 99"]


@pytest.mark.parametrize("flags, needle", [
    (["-p", "0"], "-p/--envoy-port: invalid port '0'"),
    (["-z", "70000"], "-z/--inbound-capture-port: invalid port '70000'"),
    (["-e", "x"], "invalid port 'x'"),
    (["-d", "15090,abc"], "-d/--istio-local-exclude-ports: invalid port 'abc'"),
    (["-b", "80,*"], "invalid port '*'"),
    (["-o", "-1"], "invalid port '-1'"),
    (["-i", "10.0.0.0/33"], "invalid CIDR '10.0.0.0/33'"),
    (["-i", "10.0.0.1"], "invalid CIDR '10.0.0.1' (expected ADDRESS/PREFIX)"),
    (["-x", "*"], "'*' is not allowed here"),
    (["-x", "300.1.1.1/8"], "invalid CIDR '300.1.1.1/8'"),
    (["-m", "redirect"], "invalid interception mode 'redirect'"),
    (["-m", "NONE"], "invalid interception mode 'NONE'"),
    (["-u", "istio"], "-u/--proxy-uid: invalid id 'istio'"),
    (["-g", ""], "-g/--proxy-gid: empty"),
    (["-k", "bad name"], "invalid interface name 'bad name'"),
    (["-r", "254"], "route table 254 is reserved"),
    (["--bogus"], "unknown flag --bogus"),
    (["-p"], "-p needs a value"),
    (["extra"], "unexpected argument 'extra'"),
    (["--redirect-dns"], "DNS capture is not supported"),
    (["--force-iptables-binary", "x"], "--force-iptables-binary: invalid value 'x'"),
])
def test_invalid_flags_exit_2_with_one_line(flags, needle):
    p = subprocess.run([sys.executable, TOOL, "--dry-run", *flags], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("istio-iptables: error: ") and needle in lines[0], p.stderr


def test_bad_loopback_cidr_env_is_rejected():
    env = dict(os.environ, ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR="10.0.0.1/8")
    p = subprocess.run([sys.executable, TOOL, "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=20)
    assert p.returncode == 2 and "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" in p.stderr
    env["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"] = "127.0.0.1/8"
    assert "-A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN" in dry_run(env=env)


# ---------------------------------------------------------------------------------------------
# Real installs inside fresh network namespaces
# ---------------------------------------------------------------------------------------------

def tool(ns, *flags, env=None, check=True):
    argv = [sys.executable, TOOL, *flags]
    if env:
        argv = ["env"] + [f"{k}={v}" for k, v in env.items()] + argv
    p = ns.run(argv, check=False, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def saved(ns, binary="iptables-save"):
    """iptables-save output without comments and counters (comparable between namespaces)."""
    out = ns.run([binary]).stdout
    return "\n".join(line.split(" [")[0] if line.startswith(":") else line
                     for line in out.splitlines() if not line.startswith("#"))


def rules_and_chains(text):
    """Only what matters for 'empty': user chains and rules (empty tables are ignored)."""
    return [line for line in text.splitlines()
            if line.startswith("-A") or (line.startswith(":") and not line.split()[1] in ("ACCEPT", "DROP"))]


def test_apply_in_netns_equals_istio_golden(netns_env):
    ours, ref = netns_env.netns("ours"), netns_env.netns("ref")
    tool(ours, *INJECTED)
    # The reference: Istio's golden rule text fed straight to iptables-restore in another namespace.
    ref.run(["iptables-restore", "--noflush"], input=INJECTED_V4)
    ref.run(["ip6tables-restore", "--noflush"], input=INJECTED_V6)
    v4 = saved(ours)
    assert v4 == saved(ref)
    assert saved(ours, "ip6tables-save") == saved(ref, "ip6tables-save")
    lines = v4.splitlines()
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in lines
    assert "-A OUTPUT -j ISTIO_OUTPUT" in lines
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in lines
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in lines
    # ::6 is on lo for the proxy's IPv6 inbound passthrough (like 127.0.0.6).
    assert "::6/128" in ours.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout


def test_rerun_gives_same_rules_and_switches_mode(netns_env):
    ns = netns_env.netns("rerun")
    tool(ns, *INJECTED)
    first = saved(ns), saved(ns, "ip6tables-save")
    tool(ns, *INJECTED)
    assert (saved(ns), saved(ns, "ip6tables-save")) == first
    # A different configuration replaces the old one completely (TPROXY, then back).
    tool(ns, *INJECTED[:6], "-m", "TPROXY", *INJECTED[8:])
    assert "ISTIO_TPROXY" in saved(ns)
    assert "fwmark 0x539 lookup 133" in ns.run(["ip", "rule"]).stdout
    tool(ns, *INJECTED)
    # (an empty mangle table stays behind; its chains and rules are gone)
    assert rules_and_chains(saved(ns)) == rules_and_chains(first[0])
    assert rules_and_chains(saved(ns, "ip6tables-save")) == rules_and_chains(first[1])
    assert "fwmark" not in ns.run(["ip", "rule"]).stdout


def test_cleanup_returns_to_empty_state(netns_env):
    ns = netns_env.netns("clean")
    p = tool(ns, "clean")  # nothing installed: fine
    assert "nothing to remove" in p.stderr
    empty4, empty6 = rules_and_chains(saved(ns)), rules_and_chains(saved(ns, "ip6tables-save"))
    assert empty4 == [] and empty6 == []
    for mode, install_extra, clean_extra in (
            # Clean-up needs no flags for what jumps to ISTIO_* chains or for the TPROXY rules...
            ("REDIRECT", ["--drop-invalid", "-o", "22"], []),
            ("TPROXY", ["--drop-invalid", "-o", "22"], []),
            # ...but the plain RETURN rules for -k/-c interfaces need the same -k/-c (as in Istio).
            ("TPROXY", ["-k", "eth9", "-c", "eth8"], ["-k", "eth9", "-c", "eth8"])):
        tool(ns, *INJECTED[:6], "-m", mode, *INJECTED[8:], *install_extra)
        assert rules_and_chains(saved(ns)) != []
        tool(ns, "--cleanup", *clean_extra)
        assert rules_and_chains(saved(ns)) == []
        assert rules_and_chains(saved(ns, "ip6tables-save")) == []
        assert "fwmark" not in ns.run(["ip", "rule"]).stdout
        assert "fwmark" not in ns.run(["ip", "-6", "rule"]).stdout
        assert ns.run(["ip", "route", "show", "table", "133"], check=False).stdout.strip() == ""


def test_cleanup_leaves_foreign_rules_alone(netns_env):
    ns = netns_env.netns("foreign")
    ns.run(["iptables", "-t", "nat", "-N", "APP_CHAIN"])
    ns.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "APP_CHAIN"])
    ns.run(["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "8", "-j", "RETURN"])
    before = saved(ns)
    tool(ns, *INJECTED)
    tool(ns, "clean")
    assert saved(ns) == before


def test_invalid_flags_leave_rules_untouched(netns_env):
    ns = netns_env.netns("inval")
    tool(ns, *INJECTED)
    before = saved(ns), saved(ns, "ip6tables-save")
    for bad in (["-p", "99999"], ["-i", "not-a-cidr"], ["-m", "TPROXYY"], ["clean", "--nope"]):
        p = tool(ns, *bad, check=False)
        assert p.returncode == 2, bad
        assert len(p.stderr.splitlines()) == 1 and "error:" in p.stderr
        assert (saved(ns), saved(ns, "ip6tables-save")) == before


def test_failed_apply_rolls_back(netns_env, tmp_path):
    """ip6tables-restore fails after the IPv4 rules went in: IPv4 is put back as it was."""
    fake = tmp_path / "ip6tables-restore"
    fake.write_text("#!/bin/sh\necho simulated failure >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
    ns = netns_env.netns("fail")
    p = tool(ns, *INJECTED, env=env, check=False)
    assert p.returncode == 1 and "simulated failure" in p.stderr
    assert rules_and_chains(saved(ns)) == []
    tool(ns, *INJECTED[:-2], "-d", "15090")  # an older installation stays intact too
    before = saved(ns)
    p = tool(ns, *INJECTED, env=env, check=False)
    assert p.returncode == 1
    assert saved(ns) == before


def test_dry_run_in_netns_changes_nothing(netns_env):
    ns = netns_env.netns("dry")
    before = saved(ns)
    p = tool(ns, "--dry-run", *INJECTED)
    assert p.stdout.startswith("# iptables-restore --noflush\n* nat\n")
    assert saved(ns) == before


def test_ipv6_disabled_is_skipped(netns_env):
    ns = netns_env.netns("nov6")
    ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
    p = tool(ns, *INJECTED)
    assert "skipping ip6tables" in p.stderr
    assert "ISTIO_OUTPUT" in saved(ns)
    p = tool(ns, *INJECTED, "--ipv6=on", check=False)
    assert p.returncode == 1 and "ip6tables unusable" in p.stderr


def test_tproxy_apply_and_routes(netns_env):
    ns = netns_env.netns("tpx")
    tool(ns, *INJECTED[:6], "-m", "TPROXY", *INJECTED[8:])
    mangle = saved(ns)
    assert "-A ISTIO_DIVERT -j ACCEPT" in mangle
    assert "-j TPROXY --on-port 15006" in mangle
    assert "-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark" in mangle
    for fam in ("-4", "-6"):
        rules = ns.run(["ip", fam, "rule"]).stdout
        assert rules.count("fwmark 0x539 lookup 133") == 1
        assert "local default dev lo" in ns.run(["ip", fam, "route", "show", "table", "133"]).stdout
    tool(ns, *INJECTED[:6], "-m", "TPROXY", *INJECTED[8:])  # re-run: no duplicate ip rule
    assert ns.run(["ip", "rule"]).stdout.count("fwmark 0x539 lookup 133") == 1


@pytest.mark.skipif(not shutil.which("iptables-legacy"), reason="iptables-legacy not installed")
def test_legacy_variant(netns_env):
    ns = netns_env.netns("legacy")
    tool(ns, *INJECTED, "--force-iptables-binary", "legacy")
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in saved(ns, "iptables-legacy-save")
    tool(ns, *INJECTED, "--force-iptables-binary=legacy")
    tool(ns, "clean", "--force-iptables-binary", "legacy")
    assert rules_and_chains(saved(ns, "iptables-legacy-save")) == []


# ---------------------------------------------------------------------------------------------
# Real traffic: capture and original destination
# ---------------------------------------------------------------------------------------------

# Listens on the given ports; for each connection writes one line:
#   "<listening port> <SO_ORIGINAL_DST ip:port> <local ip:port>"  and closes.
SERVER = r"""
import selectors, socket, struct, sys
transparent = sys.argv[1] == "transparent"
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT, as the proxy does for TPROXY
    s.bind(("0.0.0.0", port))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ, port)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _peer = key.fileobj.accept()
        with conn:
            try:
                raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST -> sockaddr_in
                orig = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0])
            except OSError as e:
                orig = "none(%d)" % e.errno
            local = "%s:%d" % conn.getsockname()
            conn.sendall(("%d %s %s\n" % (key.data, orig, local)).encode())
"""

CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    c.settimeout(5)
    data = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
print(data.decode().strip())
"""


def connect(ns, ip, port, uid=None):
    p = ns.run([sys.executable, "-c", CLIENT, ip, str(port)], uid=uid, check=False, timeout=15)
    assert p.returncode == 0, f"client uid={uid} -> {ip}:{port}: {p.stderr.strip()}"
    return p.stdout.strip().split()


def start_server(env, ns, ports, uid=None, transparent=False):
    proc = env.spawn(ns, [sys.executable, "-c", SERVER, "transparent" if transparent else "plain",
                          *map(str, ports)], uid=uid)
    assert wait_for_line(proc, timeout=10) == "ready"
    return proc


def test_capture_outbound_and_inbound(netns_env):
    pod, peer = netns_env.netns("pod"), netns_env.netns("peer")
    pod_ip, peer_ip = netns_env.veth(pod, peer)
    tool(pod, *INJECTED)
    # The "proxy" in the pod runs as 1337 like istio-proxy; the app on 15021/15008 is not captured.
    start_server(netns_env, pod, [15001, 15006, 15021, 15008], uid=1337)
    start_server(netns_env, peer, [8080, 9090])

    # App (uid 1000) -> peer: redirected to 15001, the original destination is recoverable.
    assert connect(pod, peer_ip, 8080, uid=1000) == ["15001", f"{peer_ip}:8080", "127.0.0.1:15001"]
    assert connect(pod, peer_ip, 9090, uid=1000)[:2] == ["15001", f"{peer_ip}:9090"]
    # The proxy itself (uid 1337) -> peer: not redirected, reaches the peer.
    # (the peer has no NAT/conntrack, so its SO_ORIGINAL_DST fails: only port and address count)
    reply = connect(pod, peer_ip, 8080, uid=1337)
    assert (reply[0], reply[2]) == ("8080", f"{peer_ip}:8080")
    # Peer -> pod: captured on 15006 with the original destination; excluded ports go direct.
    assert connect(peer, pod_ip, 9090) == ["15006", f"{pod_ip}:9090", f"{pod_ip}:15006"]
    assert connect(peer, pod_ip, 15021) == ["15021", f"{pod_ip}:15021", f"{pod_ip}:15021"]
    assert connect(peer, pod_ip, 15008) == ["15008", f"{pod_ip}:15008", f"{pod_ip}:15008"]

    # After clean-up nothing is captured any more.
    tool(pod, "clean")
    assert connect(pod, peer_ip, 8080, uid=1000)[0] == "8080"
    with pytest.raises(AssertionError):  # nothing listens on 9090 in the pod: refused
        connect(peer, pod_ip, 9090)


def test_capture_exclusions(netns_env):
    pod, peer = netns_env.netns("pod"), netns_env.netns("peer")
    pod_ip, peer_ip = netns_env.veth(pod, peer)
    tool(pod, *INJECTED[:8], "-i", "*", "-x", f"{peer_ip}/32", "-b", "9090", "-o", "8081")
    start_server(netns_env, pod, [15001, 15006, 9091], uid=1337)
    start_server(netns_env, peer, [8080])
    # Excluded destination CIDR: not redirected.
    assert connect(pod, peer_ip, 8080, uid=1000)[0] == "8080"
    # Only inbound port 9090 is captured.
    assert connect(peer, pod_ip, 9090)[:2] == ["15006", f"{pod_ip}:9090"]
    assert connect(peer, pod_ip, 9091)[0] == "9091"


def test_tproxy_inbound_capture(netns_env):
    pod, peer = netns_env.netns("pod"), netns_env.netns("peer")
    pod_ip, peer_ip = netns_env.veth(pod, peer)
    tool(pod, *INJECTED[:6], "-m", "TPROXY", *INJECTED[8:])
    # A transparent listener (IP_TRANSPARENT needs CAP_NET_ADMIN: the test runs it as root).
    start_server(netns_env, pod, [15006, 15001, 15021], transparent=True)
    # TPROXY keeps the destination address: the accepted socket's local address is the original.
    assert connect(peer, pod_ip, 9090) == ["15006", f"{pod_ip}:9090", f"{pod_ip}:9090"]
    assert connect(peer, pod_ip, 15021) == ["15021", f"{pod_ip}:15021", f"{pod_ip}:15021"]
    # Outbound still uses REDIRECT to 15001.
    assert connect(pod, peer_ip, 7070, uid=1000)[:2] == ["15001", f"{peer_ip}:7070"]


# ---------------------------------------------------------------------------------------------
# The namespace helper itself
# ---------------------------------------------------------------------------------------------

def test_netns_helper_cleans_up_everything():
    require_netns()
    from tests.netns import NetnsEnv
    with NetnsEnv() as env:
        a = env.netns("a")
        a_ip, host_ip = env.veth(a)  # namespace <-> host
        host_if = env.last_veth[1]
        assert a_ip.startswith("198.1") and host_ip.startswith("198.1")
        assert ",UP," in a.run(["ip", "link", "show", "lo"]).stdout
        # A background process as uid 1000 in the namespace, reachable from the host over the veth.
        code = ("import os, socket, sys; s = socket.create_server((sys.argv[1], 7000)); "
                "print(os.getuid(), flush=True); c, _ = s.accept(); c.sendall(b'hi'); c.close()")
        proc = env.spawn(a, [sys.executable, "-c", code, a_ip], uid=1000)
        assert wait_for_line(proc) == "1000"
        with socket.create_connection((a_ip, 7000), timeout=5) as c:
            c.settimeout(5)
            assert c.recv(10) == b"hi"
        sleeper = env.spawn(a, ["sleep", "60"])
        names = [ns.name for ns in env.namespaces]
    assert proc.poll() is not None and sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0
