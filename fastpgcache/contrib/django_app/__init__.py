"""Django app adding `manage.py setup_fastpgcache`; list it in INSTALLED_APPS as `fastpgcache.contrib.django_app`."""
