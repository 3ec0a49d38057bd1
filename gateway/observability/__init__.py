"""What an operator sees of a running gateway: Prometheus metrics (summed across
workers), the JSON access log, and the logging set-up of every process.

May import: :mod:`gateway.config`, the standard library and prometheus-client.
Never the request path: the access log reads a finished request through the
fields it names (:class:`~gateway.observability.accesslog.Finished`), which
the request record has.
"""
