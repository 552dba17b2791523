"""The read-only web status pages and Prometheus ``/metrics`` of the daemon (``[web]``).

The service starts it with :func:`start_web` and stops it with :meth:`WebServer.stop`; it reads
the daemon's status model and state store and never changes anything (see :mod:`.server`).
"""

from anonpipe.web.server import WebServer, WebStartError, start_web

__all__ = ["WebServer", "WebStartError", "start_web"]
