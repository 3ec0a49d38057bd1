"""What an operator sees of a running gateway: Prometheus metrics (summed across
workers), the JSON access log, and the logging set-up of every process.

May import: :mod:`gateway.config` and the standard library (plus
prometheus-client). Never the request path: it reads a finished request through
the fields of the request record it is handed.
"""
