"""A minimal Django project whose cache is fastpgcache."""
