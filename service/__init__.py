"""Online serving: FastAPI app, engines, catalogue store, metrics. Never imports training."""
