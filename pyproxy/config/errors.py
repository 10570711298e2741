"""Configuration errors that name the resource, the field and the reason."""


class ConfigError(Exception):
    """Invalid or unsupported configuration.

    ``str(err)`` reads like Envoy's rejections: ``<resource>: <field>: <reason>``. Context is added
    as the error travels up (``err.within("listener 'x'")``) so the final message names the path.
    """

    def __init__(self, reason: str, field: str = "", resource: str = ""):
        self.reason = reason
        self.field = field
        self.resource = resource
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [p for p in (self.resource, self.field, self.reason) if p]
        return ": ".join(parts)

    def within(self, resource: str = "", field: str = "") -> "ConfigError":
        if field:
            self.field = field + ("." + self.field if self.field else "")
        if resource and not self.resource:
            self.resource = resource
        elif resource:
            self.resource = resource + ": " + self.resource
        self.args = (self._render(),)
        return self

    def __str__(self) -> str:
        return self._render()
