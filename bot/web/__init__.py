"""The process's HTTP side: probes, Prometheus metrics, Telegram webhooks and the operator page.

One server per process (``HTTP_PORT``; off when unset), built with Starlette and served by uvicorn on the
process's event loop next to the adapters (:func:`bot.web.serving.run_http`).
"""
