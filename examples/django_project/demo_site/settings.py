"""Settings of the demo: only what the cache needs.

The cache LOCATION is FASTPGCACHE_URL, or a throwaway embedded PostgreSQL
started for this process when it is not set.
"""
from fastpgcache.embedded import default_url

SECRET_KEY = "demo-only-not-secret"
DEBUG = True
USE_TZ = True
INSTALLED_APPS = [
    "fastpgcache.contrib.django_app",  # adds `manage.py setup_fastpgcache`
    "demo_site",
]
CACHES = {
    "default": {
        "BACKEND": "fastpgcache.contrib.django.FastPgCache",
        "LOCATION": default_url(),
        "TIMEOUT": 300,
        "KEY_PREFIX": "demo",
        "OPTIONS": {
            "schema": "public",
            "table": "cache",
            "engine_options": {"pool_size": 5},
            "MAX_ENTRIES": 10_000,  # DatabaseCache's culling settings work as they do there
            "CULL_FREQUENCY": 3,
        },
    }
}
