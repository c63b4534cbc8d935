"""OpenAI-compatible HTTP server (``adaspec serve``); see README.md in this folder.

Modules: ``app`` (routes, request handling, lifecycle), ``schemas`` (request validation), ``errors``
(OpenAI-shaped errors), ``auth`` (keys and tenant namespaces), ``scheduler`` (the engine thread),
``metrics`` (Prometheus), ``__main__`` (command line, signal handling).
"""
