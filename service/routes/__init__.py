"""HTTP routers: thin translations between HTTP and the serving classes."""

from service.routes import health, items, recommend, tokenize

ROUTERS = (recommend.router, tokenize.router, items.router, health.router)
