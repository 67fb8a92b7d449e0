"""A bounded `endpoint` label for BentoML's own request metrics.

BentoML's metrics middleware (RunnerTrafficMetricsMiddleware in bentoml/_internal/server/http/instruments.py)
labels every request with its raw path, and it is the outermost middleware, so it sees a request before the
guard or the router can refuse it: each unknown path a client invents made new series (5,000 paths gave
101,000 series and a 20 MB scrape). Here the same middleware labels a path the server does not serve as
OTHER; the app behind it still sees the request's real path (and answers 404 as before).
"""

from __future__ import annotations

from bentoml._internal.server.http import instruments

from service import front
from service.routes import ROUTES

OTHER = "(other)"
# BentoML's own routes (base_app.get_system_routes, _bentoml_impl/server/app.py) and the service's APIs
KNOWN = frozenset({"/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json", *ROUTES})
MOUNTS = ("/static_content", "/assets")  # folders of static files: one label each
_REAL_PATH = "imgclf.real_path"  # scope key carrying the real path past the metrics middleware


def path_label(path: str) -> str:
    """The path as a metrics label: itself when the server serves it, else one of a fixed few."""
    if path in KNOWN:
        return path
    return next((m for m in MOUNTS if path.startswith(m + "/")), OTHER)


def _with_real_path(app):
    async def app_with_real_path(scope, receive, send):
        if _REAL_PATH in scope:
            scope = {k: v for k, v in scope.items() if k != _REAL_PATH} | {"path": scope[_REAL_PATH]}
        await app(scope, receive, send)
    return app_with_real_path


class BoundedPathMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, shown the path's label in place of the raw path; a POST /predict goes
    through the front door (service/front.py) when the layers inside allow it."""

    def __init__(self, app, **kwargs):
        super().__init__(_with_real_path(app), **kwargs)
        self._inner, self._door = app, None  # the door: made at the first /predict, False when not allowed

    def _open_door(self) -> front.FrontDoor | bool:
        if not self._is_setup:
            self._setup()
        found = front.find_guard(self._inner)
        self._door = front.FrontDoor(*found, self) if found else False
        return self._door

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in front.PATHS and scope["method"] == "POST" and (
                door := self._door if self._door is not None else self._open_door()):
            return await door(scope, receive, send)
        if scope["type"] == "http" and (label := path_label(scope["path"])) != scope["path"]:
            scope = {**scope, "path": label, _REAL_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


def install() -> None:
    """Make BentoML build its metrics middleware from BoundedPathMetrics (it imports the class by name from
    its module when it builds a worker's app, after the service module is imported)."""
    if not issubclass(instruments.RunnerTrafficMetricsMiddleware, BoundedPathMetrics):
        instruments.RunnerTrafficMetricsMiddleware = BoundedPathMetrics
