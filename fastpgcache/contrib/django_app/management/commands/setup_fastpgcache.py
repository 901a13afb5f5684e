"""`manage.py setup_fastpgcache`: create or upgrade the table of every fastpgcache cache in CACHES."""
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.utils.module_loading import import_string

from fastpgcache.admin import add_setup_arguments, cache_status, setup_cache
from fastpgcache.contrib.django import FastPgCache
from fastpgcache.errors import CacheError


class Command(BaseCommand):
    help = ("Create or upgrade the fastpgcache table of each CACHES entry using fastpgcache "
            "(through its migrations; safe to run again). Run it as a role that may create tables.")

    def add_arguments(self, parser):
        parser.add_argument("aliases", nargs="*", metavar="alias", help="cache aliases (default: all fastpgcache ones)")
        add_setup_arguments(parser)
        parser.add_argument("--check", action="store_true", help="only report; fail if a table is not set up")

    def handle(self, *args, aliases=(), logged=None, grant_to=None, check=False, **options):
        backends = {alias: self._backend(alias, explicit=bool(aliases)) for alias in aliases or settings.CACHES}
        backends = {alias: backend for alias, backend in backends.items() if backend is not None}
        if not backends:
            raise CommandError("no cache in CACHES uses fastpgcache.contrib.django.FastPgCache")
        for alias, backend in backends.items():
            store = backend.store
            try:
                status = (cache_status(store.bind, store.schema, store.table) if check else
                          self._set_up(backend, logged=logged, grant_to=grant_to))
            except CacheError as error:
                raise CommandError(f"cache {alias!r}: {error}") from None
            if not status["revision"]:
                raise CommandError(f"cache {alias!r}: {store.schema}.{store.table} is not set up; "
                                   "run `manage.py setup_fastpgcache`")
            kind = "UNLOGGED" if status["unlogged"] else "LOGGED"
            self.stdout.write(f"cache {alias!r}: {store.schema}.{store.table} ready ({kind}, "
                              f"revision {status['revision']})")

    @staticmethod
    def _set_up(backend: FastPgCache, **choices) -> dict:
        # On an Engine of its own: the backend's statement_timeout would cut a long migration short.
        engine = backend._admin_engine()
        try:
            return setup_cache(engine=engine, schema=backend.store.schema, table=backend.store.table, **choices)
        finally:
            engine.dispose()

    @staticmethod
    def _backend(alias: str, explicit: bool):
        # Named aliases must be fastpgcache caches; without names, other backends are skipped unbuilt
        # (building one may need a client library this process lacks).
        if alias not in settings.CACHES:
            raise CommandError(f"no cache {alias!r} in CACHES (have: {', '.join(settings.CACHES)})")
        if not _uses_fastpgcache(settings.CACHES[alias]):
            if explicit:
                raise CommandError(f"cache {alias!r} does not use fastpgcache.contrib.django.FastPgCache")
            return None
        try:
            return caches[alias]
        except (ImproperlyConfigured, ValueError, TypeError) as error:
            raise CommandError(f"cache {alias!r}: {error}") from None


def _uses_fastpgcache(params: dict) -> bool:
    backend = params.get("BACKEND", "")
    try:
        found = import_string(backend)
    except ImportError:
        return False
    return isinstance(found, type) and issubclass(found, FastPgCache)
