"""SDS over the ADS stream: secrets validated and installed in the secret store, which rebuilds the
TLS contexts using them (a ConfigError NACKs the response). Secrets from their own config sources
are ``xds.sds``'s."""

from __future__ import annotations

import time

from ..xds_client import SECRET


class SecretsHandler:
    type_url = SECRET

    def __init__(self, xds):
        self.xds = xds
        self.secrets: dict = {}
        self.versions: dict = {}      # name -> (version_info, time applied)

    def apply(self, version, added, removed):
        from ..tls.secrets import STORE
        STORE.apply_sds(added, removed, version)
        for name, sec in added.items():
            self.secrets[name] = sec
            self.versions[name] = (version, time.time())
        for name in removed:
            self.secrets.pop(name, None)
