"""Command line: Envoy's flags (as Istio's agent passes them) plus pyproxy's own subcommands.

    pyproxy -c bootstrap.yaml [--concurrency N] [-l info] ...     # run, like envoy
    pyproxy --mode validate -c bootstrap.yaml                     # check a config, exit 0/1
    pyproxy validate FILE...                                      # bootstraps and config dumps
    pyproxy control-plane --config-dir DIR --port N               # file-driven ADS server
    pyproxy example                                               # the bundled demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__

ENVOY_API_VERSION = "1.40.0"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("PARSE ERROR: %s\n" % message)
        sys.exit(1)


def _bool_flag(p, *names, help=""):
    p.add_argument(*names, action="store_true", help=help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyproxy", description="pyproxy: a Python data plane with Envoy's interface",
                allow_abbrev=False)
    p.add_argument("-c", "--config-path", default="", help="bootstrap file (JSON or YAML)")
    p.add_argument("--config-yaml", default="", help="YAML bootstrap merged over the file")
    p.add_argument("--mode", default="serve", choices=["serve", "validate", "init_only"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("-l", "--log-level", default="info")
    p.add_argument("--component-log-level", default="")
    p.add_argument("--log-format", default=None)
    p.add_argument("--log-format-escaped", action="store_true")
    p.add_argument("--log-path", default=None)
    p.add_argument("--drain-time-s", type=int, default=600)
    p.add_argument("--drain-strategy", default="gradual", choices=["gradual", "immediate"])
    p.add_argument("--parent-shutdown-time-s", type=int, default=900)
    p.add_argument("--local-address-ip-version", default="v4", choices=["v4", "v6"])
    p.add_argument("--file-flush-interval-msec", type=int, default=10000)
    _bool_flag(p, "--disable-hot-restart")
    _bool_flag(p, "--allow-unknown-static-fields")
    _bool_flag(p, "--reject-unknown-dynamic-fields")
    _bool_flag(p, "--ignore-unknown-dynamic-fields")
    p.add_argument("--base-id", type=int, default=0)
    _bool_flag(p, "--use-dynamic-base-id")
    p.add_argument("--base-id-path", default="")
    p.add_argument("--restart-epoch", type=int, default=0)
    p.add_argument("--service-cluster", default="")
    p.add_argument("--service-node", default="")
    p.add_argument("--service-zone", default="")
    _bool_flag(p, "--skip-deprecated-logs")
    p.add_argument("--admin-address-path", default="")
    _bool_flag(p, "--disable-extensions-check")
    p.add_argument("--socket-path", default="")
    p.add_argument("--socket-mode", default="")
    _bool_flag(p, "--enable-core-dump")
    p.add_argument("--stats-tag", action="append", default=[])
    p.add_argument("--version", action="store_true")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers extensions); also PYPROXY_PLUGINS=a,b")
    return p


def load_plugins(names) -> str | None:
    """Import plugin modules (HTTP/network filters written as plain Python classes register
    themselves with ``REGISTRY.register``). Returns an error line, or None."""
    import importlib
    for name in names:
        name = name.strip()
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # a plugin's import error is the user's to see, in one line
            return "cannot load plugin '%s': %s: %s" % (name, type(e).__name__, e)
    return None


def version_line() -> str:
    return "pyproxy  version: %s/%s/Clean/RELEASE/Python-%d.%d" % (
        __version__, ENVOY_API_VERSION, sys.version_info[0], sys.version_info[1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    err = load_plugins(os.environ.get("PYPROXY_PLUGINS", "").split(","))
    if err:
        sys.stderr.write("error: %s\n" % err)
        return 1
    if argv and argv[0] == "validate":
        from .validate import main as vmain
        return vmain(argv[1:])
    if argv and argv[0] == "control-plane":
        from .control_plane import main as cmain
        return cmain(argv[1:]) or 0
    if argv and argv[0] == "example":
        from .examples.run import main as emain
        return emain(argv[1:])
    args = build_parser().parse_args(argv)
    if args.version:
        print(version_line())
        return 0
    err = load_plugins(args.plugin)
    if err:
        sys.stderr.write("error: %s\n" % err)
        return 1
    from .log import setup_logging
    try:
        setup_logging(args.log_level, args.component_log_level, args.log_format, args.log_path)
    except (ValueError, OSError) as e:
        sys.stderr.write("error: %s\n" % e)
        return 1
    log = logging.getLogger("pyproxy.main")
    if args.concurrency < 0:
        sys.stderr.write("error: --concurrency must be >= 0\n")
        return 1
    if args.concurrency == 0:
        args.concurrency = os.cpu_count() or 1  # Envoy/Istio: 0 means one worker per core
    from .config import ConfigError
    from .config.bootstrap import load_bootstrap
    from . import extensions, access_log  # noqa: F401
    from .server import Options
    opts = Options(**{k: v for k, v in vars(args).items() if k != "version"})
    try:
        bootstrap = load_bootstrap(args.config_path or None, args.config_yaml or None,
                                   allow_unknown=args.allow_unknown_static_fields)
    except ConfigError as e:
        sys.stderr.write("error initializing configuration '%s': %s\n" % (args.config_path, e))
        return 1
    if args.mode == "validate":
        return _validate_mode(bootstrap, opts)
    log.info("initializing pyproxy %s (Envoy v3 API), pid %d", __version__, os.getpid())
    from .server import run
    return run(bootstrap, opts)


def _validate_mode(bootstrap, opts) -> int:
    """Envoy's --mode validate: compile everything, bind nothing."""
    import asyncio
    from .config import ConfigError
    from .server import Server
    from .config import unacted
    loop = asyncio.new_event_loop()
    unacted.reset()
    try:
        server = Server(bootstrap, opts, loop)
        server.compile_static()
    except ConfigError as e:
        sys.stderr.write("error initializing configuration '%s': %s\n" % (opts.config_path, e))
        return 1
    finally:
        loop.close()
    print("configuration '%s' OK" % (opts.config_path or "--config-yaml"))
    for line in unacted.warned():  # fields accepted but not acted on (also logged at WARNING)
        print("  not acted on: %s" % line)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
