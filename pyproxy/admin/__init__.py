"""Envoy's admin API for pyproxy.

- ``pyproxy.admin.server.start_admin(ctx, host, port, *, uds_path=None, access_logs=None)``
  serves it; ``ctx`` satisfies ``pyproxy.admin.context.AdminContext``.
- ``pyproxy.admin.stats_render``: Envoy's /stats text, JSON and Prometheus formats.
- ``pyproxy.admin.config_dump``: /config_dump ``resource``/``mask``/``name_regex``.
- ``pyproxy.admin.handlers``: the endpoint table.
"""
