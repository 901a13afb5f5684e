"""`manage.py cache_demo`: create the cache table, then use Django's cache API on it."""
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Set up the fastpgcache table and exercise the Django cache API against it."

    def handle(self, *args, **options):
        call_command("setup_fastpgcache", stdout=self.stdout)  # idempotent: a no-op once the table exists
        cache.set("greeting", {"text": "hello", "tags": ("a", "b")}, timeout=60)
        self.stdout.write(f"get(greeting) = {cache.get('greeting')}")
        self.stdout.write(f"add(greeting) again = {cache.add('greeting', 'other')}")
        cache.set("visits", 0, timeout=None)
        self.stdout.write(f"incr(visits) = {cache.incr('visits')}")
        try:
            cache.incr("no-such-counter")
        except ValueError as error:
            self.stdout.write(f"incr(missing) raises ValueError: {error}")
        self.stdout.write(f"get_or_set(answer) = {cache.get_or_set('answer', lambda: 6 * 7)}")
        self.stdout.write(f"ttl(greeting) = {cache.store.ttl(cache.make_key('greeting'))} s")
        cache.delete_many(["greeting", "visits", "answer"])
        self.stdout.write(f"after delete_many: has_key(greeting) = {cache.has_key('greeting')}")
