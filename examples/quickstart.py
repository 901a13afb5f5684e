"""Quickstart: set/get/ttl against FASTPGCACHE_URL, or a throwaway embedded PostgreSQL.

    python examples/quickstart.py
"""
from fastpgcache import FastPgCache, setup_cache
from fastpgcache.embedded import default_url


def main() -> None:
    url = default_url()  # FASTPGCACHE_URL, or a fresh embedded server stopped at exit
    status = setup_cache(url=url)  # the admin's one-time step; running it again changes nothing
    print(f"cache table: {status['schema']}.{status['table']} unlogged={status['unlogged']}")

    with FastPgCache(url=url) as cache:
        cache.set("session:abc", {"user": "Alice", "roles": ["admin"]}, ttl=3600)
        cache.set("greeting", "123")  # a str stays a str, even when it looks like JSON
        print("session:abc =", cache.get("session:abc"))
        print("greeting =", repr(cache.get("greeting")))
        print("ttl(session:abc) =", cache.ttl("session:abc"))
        print("ttl(greeting) =", cache.ttl("greeting"), "(-1: no expiry)")
        print("ttl(missing) =", cache.ttl("missing"), "(-2: not found)")
        print("incr(visits) =", cache.incr("visits"))


if __name__ == "__main__":
    main()
