"""A Starlette endpoint that caches a slow call in PostgreSQL through `AsyncFastPgCache`.

    pip install 'fastpgcache[asgi]' httpx2
    python examples/asgi_app.py                  # two requests through Starlette's TestClient
    uvicorn --factory asgi_app:create_app        # or serve it (from examples/, FASTPGCACHE_URL set)

The first request for a city waits for the slow forecast; the next ones within
the ttl are answered from the cache table, by any worker process. A city never
asked for is answered "absent" by the client's negative-lookup guard, without
a round trip.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time

from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastpgcache import AsyncFastPgCache

FORECAST_TTL = 60


async def slow_forecast(city: str) -> dict:
    """Stands in for a slow upstream API."""
    await asyncio.sleep(0.2)
    return {"city": city, "forecast": "sunny", "computed_at": time.time()}


async def forecast(request):
    city = request.path_params["city"]
    state = request.app.state

    async def compute():
        state.upstream_calls += 1
        return await slow_forecast(city)

    return JSONResponse(await state.cache.get_or_set(f"forecast:{city}", compute, ttl=FORECAST_TTL))


def create_app(url=None, schema: str | None = None) -> Starlette:
    """The app, caching in `schema` of the database at `url` (default: FASTPGCACHE_URL).

    The URL's driver becomes psycopg 3's async one; the cache table must exist
    (`fastpgcache-admin`, or `setup_cache()` as in `main()`).
    """
    target = make_url(url or os.environ["FASTPGCACHE_URL"]).set(drivername="postgresql+psycopg")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with AsyncFastPgCache(url=target, schema=schema or "public") as cache:
            app.state.cache = cache
            app.state.upstream_calls = 0
            yield

    return Starlette(routes=[Route("/forecast/{city}", forecast)], lifespan=lifespan)


def main() -> None:
    from starlette.testclient import TestClient

    from fastpgcache import setup_cache
    from fastpgcache.embedded import default_url

    url = default_url()  # FASTPGCACHE_URL, or a throwaway embedded server
    setup_cache(url=url)
    with TestClient(create_app(url)) as client:
        for attempt in ("first", "second"):
            started = time.perf_counter()
            body = client.get("/forecast/Paris").json()
            print(f"{attempt} request: {body} in {(time.perf_counter() - started) * 1000:.0f} ms")
        print("upstream calls:", client.app.state.upstream_calls)


if __name__ == "__main__":
    main()
