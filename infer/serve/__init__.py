"""``zaya serve``: an OpenAI-compatible HTTP server on the engine, with Markov RSA as a chat extension.

Modules: ``protocol`` (request bodies, the error object), ``text`` (stop strings, finish reasons),
``driver`` (the engine's one thread), ``jobs`` (a request's engine work as async events), ``metrics``
(the Prometheus registry of /metrics), ``app`` (the ASGI routes), ``cli`` (the command). Needs the ``serve``
extra (fastapi, uvicorn, prometheus-client).
"""
