"""App config: the label Django shows for the setup command."""
from django.apps import AppConfig


class FastPgCacheConfig(AppConfig):
    name = "fastpgcache.contrib.django_app"
    label = "fastpgcache"
    verbose_name = "fastpgcache"
