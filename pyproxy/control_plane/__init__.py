"""A small file-driven xDS management server (ADS, state-of-the-world and delta).

    python3 -m pyproxy.control_plane --config-dir DIR --port N [--address 127.0.0.1]
                                     [--uds PATH] [--status-file FILE] [--poll-interval 0.3]

Serves the Envoy resources found in DIR to any number of proxies (pyproxy or Envoy) over
``StreamAggregatedResources`` (SotW) and ``DeltaAggregatedResources`` (delta), on TCP and/or a unix
socket. ``--port 0`` picks a free port; the chosen one is printed as ``listening port=N`` on stdout.

Files
-----
Every ``*.yaml``, ``*.yml`` and ``*.json`` file in DIR (not subdirectories, not dot-files). A YAML file
may hold several documents. Each document is one of:

* a list of resources;
* a mapping ``{resources: [...]}``;
* a single resource (a mapping with ``@type``);
* an Envoy config dump (the JSON of ``/config_dump`` or ``istioctl proxy-config all -o json``,
  ``{configs: [...]}``) or one of its ``*ConfigDump`` sections: the *dynamic* resources are served
  (active and warming listeners, clusters, route configs, scoped route configs, endpoint configs,
  secrets). Static ones are not: they belong to the bootstrap.

A resource is Envoy's JSON (proto3 JSON mapping) of the resource with an ``@type``: a full type URL
(``type.googleapis.com/envoy.config.cluster.v3.Cluster``), a full proto name, or a short name:
``Listener``, ``Cluster``, ``RouteConfiguration``, ``ScopedRouteConfiguration``, ``VirtualHost``,
``ClusterLoadAssignment``, ``Secret``, ``Runtime``. The name is the resource's ``name`` (or
``cluster_name`` for ClusterLoadAssignment). A (type, name) defined twice with different content is
an error.

Typed configs (``typed_config`` and other ``Any`` fields) of types no proto module here defines (Istio's
``istio.stats``, ``istio.metadata_exchange``...) are sent as ``xds.type.v3.TypedStruct`` carrying the
original type URL and the JSON body as its value: the standard wire form for a config whose proto the
sender lacks. pyproxy's registry sees through it to the original type.

Versions and pushes
-------------------
DIR is polled every ``--poll-interval`` seconds (name, inode, mtime and size of each file). When
something changed and the whole directory parses, a new snapshot gets the next version number and
every connected stream is pushed what changed for the names it subscribed to: SotW sends the full set
of each type whose content changed (``version_info`` = snapshot version); delta sends only changed
resources (per-resource version = digest of its bytes) and ``removed_resources``. If any file is
invalid the error is logged and the last good snapshot keeps being served. A file being rewritten
may be seen half-written: that load fails and the next poll picks up the finished file.

Protocol: LDS/CDS are usually wildcard (empty first request, or ``*``), RDS/EDS/SDS by name; SotW
requests with a stale nonce are ignored as the xDS spec says; delta honours
``initial_resource_versions`` (resources the client already holds at the same version are not sent
again; ones that no longer exist are sent as removed).

ACKs and NACKs are logged (NACKs with their ``error_detail``) and kept in ``ControlPlane.acks`` /
``.nacks`` (and every request in ``.requests``); ``--status-file`` is rewritten as JSON with them,
the snapshot version, the resource names and the connected streams.

In-process use::

    cp = ControlPlane("dir", port=0, uds="/tmp/xds.sock")
    await cp.start(); ...; await cp.stop()
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from .server import ControlPlane  # noqa: F401
from .loader import load_dir, load_file, parse_resource  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyproxy control-plane",
                                description="Serve Envoy resources from files over ADS (SotW and delta).")
    p.add_argument("--config-dir", required=True, help="directory of YAML/JSON resource files")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (0 = pick one); omit to listen only on --uds")
    p.add_argument("--address", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    p.add_argument("--uds", default=None, help="also listen on this unix socket path")
    p.add_argument("--status-file", default=None, help="JSON file rewritten with ACKs/NACKs/streams")
    p.add_argument("--poll-interval", type=float, default=0.3, help="seconds between directory polls")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def _amain(args) -> int:
    cp = ControlPlane(args.config_dir, port=args.port, address=args.address, uds=args.uds,
                      poll_interval=args.poll_interval, status_file=args.status_file)
    try:
        await cp.start()
    except (OSError, RuntimeError) as e:
        print("control-plane: %s" % e, file=sys.stderr)
        return 1
    print("listening port=%s uds=%s" % (cp.port, args.uds or ""), flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await cp.stop()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.port is None and not args.uds:
        print("control-plane: give --port and/or --uds", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_amain(args))
