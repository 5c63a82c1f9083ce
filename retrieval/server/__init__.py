"""`retrieval serve`: indexes held warm behind an HTTP API and a web page (the `serve` extra: FastAPI, uvicorn)."""
