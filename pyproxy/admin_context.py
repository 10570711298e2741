"""The server seen through the admin API's ``AdminContext`` protocol."""

from __future__ import annotations


class ServerAdminContext:
    def __init__(self, server):
        self.server = server

    @property
    def stats(self):
        """The process's stats, summed with the workers' under --concurrency > 1."""
        w = self.server.workers
        return self.server.stats if w is None else w.merged_store(self.server.stats)

    def state(self) -> str:
        return self.server.state_name()

    def server_info(self) -> dict:
        return self.server.server_info()

    def config_dump(self, resource, include_eds):
        return self.server.config_dump(None, include_eds)

    def clusters_status(self) -> list:
        return self.server.cluster_manager.status()

    def listeners_status(self) -> list:
        return [{"name": l["name"], "local_address": l["local_address"]}
                for l in self.server.listener_manager.status()]

    def quit(self) -> None:
        self.server.loop.call_soon(self.server.quit)

    def drain_listeners(self, inbound_only: bool, graceful: bool, skip_exit: bool) -> None:
        self.server.drain_listeners(inbound_only, graceful, skip_exit)

    def set_healthcheck_failed(self, failed: bool) -> None:
        self.server.set_healthcheck_failed(failed)

    def certs(self) -> dict:
        import sys
        if "pyproxy.tls.context" not in sys.modules:
            return {"certificates": []}
        from .tls.certs import certs_json
        return certs_json()

    def reset_counters(self) -> None:
        for c in self.server.stats.counters.values():
            c.value = 0
