"""Writes go through SECURITY DEFINER functions; ordinary roles may only read their own rows.

Until now every role that used the cache held INSERT, UPDATE and DELETE on
the table. PostgreSQL lets such a role `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE`
and freeze every other role's calls. Now:

- a NOLOGIN owner role (`fastpgcache_owner` unless the admin names another)
  owns the table, its companion tables and the functions;
- ordinary roles hold SELECT on the table (row-level security shows them their
  own rows; the only lock SELECT allows, ACCESS SHARE, blocks no write) and
  EXECUTE on the write functions, which bind every row to the caller;
- each function runs as the owner with `search_path = pg_catalog, pg_temp`, so
  no object another role created can be picked up by name;
- a caller proves who it is with its role's secret (`<table>_secrets`, visible
  to that role alone) and must be acting as that role right now (the role set
  by SET ROLE, else the login): the function returns NULL otherwise, writing
  nothing, so a caller inside someone else's SECURITY DEFINER function, or one
  that kept another role's secret, can never write as that role;
- the functions enforce the limits in `<table>_settings` (largest value,
  optional entries/bytes quota per role, counted in `<table>_usage`);
- a write that inserts a key NOTIFYs the role's own channel (a hash of its
  secret) with keyed hashes of the keys, unless the notification queue is
  half full: this replaces migration 0002's trigger, which any role could
  observe and whose channel any role could flood with forged messages.

All statements inside use values computed before the statement (no now() in
an ON CONFLICT clause, no ctid, no SKIP LOCKED), so the same SQL runs on a
Citus distributed table.

Revision ID: 0004_write_functions
Revises: 0003_fillfactor
Create Date: 2026-11-29
"""
import textwrap

from sqlalchemy import MetaData, text

from alembic import context, op
from fastpgcache.admin import privilege_statements, quote_role, readers, run_ddl
from fastpgcache.catalog import distribution_of, owner_serves_citus
from fastpgcache.distributed import citus_manages_login, release_owner_login
from fastpgcache.model import DEFAULT_MAX_VALUE_BYTES, routine_name, secrets_table, settings_table, usage_table

revision = "0004_write_functions"
down_revision = "0003_fillfactor"
branch_labels = None
depends_on = None

QUEUE_LIMIT = 0.5
"""Writers stop notifying above this share of PostgreSQL's notification queue, so a full queue
(which makes NOTIFY fail at commit) can never fail a write; guards switch off well before it."""

TOKENS_PER_MESSAGE = 450
"""17 bytes per token (16 hex digits and a space): 7,650 bytes, under the 8,000-byte payload limit."""

MAX_MESSAGES = 64
"""A statement inserting more keys than this many messages hold (28,800) sends "reset" instead."""

MAX_KEY_BYTES = 1024
"""The client's key limit (fastpgcache.keys.MAX_KEY_BYTES), enforced here for callers that skip the client."""

PUBLIC_ROUTINES = ("enroll", "set", "set_many", "delete", "expire", "incr", "clear", "expire_batch", "trim", "claim")
"""What ordinary roles may EXECUTE; the rest are the functions' own helpers, or the owner's."""

INTERNAL_ROUTINES = ("hold", "charge", "announce", "cull", "cleanup_all")

READ_ROUTINES = ("key_array",)
"""Plain functions the reads call (ordinary roles may EXECUTE them; they run as the caller)."""


class _Names:
    """Quoted, schema-qualified names of everything this revision creates for one cache table."""

    def __init__(self, options, dialect):
        quote = dialect.identifier_preparer.quote
        self.options = options
        self.schema = quote(options.schema)
        self.owner = quote_role(options.owner)
        self.cache = options.qualified_table(dialect)
        self.secrets = f"{self.schema}.{quote(secrets_table(options.table).name)}"
        self.settings = f"{self.schema}.{quote(settings_table(options.table).name)}"
        self.usage = f"{self.schema}.{quote(usage_table(options.table).name)}"
        for verb in PUBLIC_ROUTINES + INTERNAL_ROUTINES + READ_ROUTINES:
            setattr(self, verb, f"{self.schema}.{quote(routine_name(options.table, verb))}")

    def sql(self, template: str) -> str:
        """`template` with {cache}, {set}, ... and the constants filled in."""
        return template.format(**vars(self), QUEUE_LIMIT=QUEUE_LIMIT, MAX_KEY_BYTES=MAX_KEY_BYTES,
                               batch_keys="coalesce(array_agg(e.key), '{}')",
                               CHUNK=TOKENS_PER_MESSAGE * 17, MOST=TOKENS_PER_MESSAGE * MAX_MESSAGES)


def _names() -> _Names:
    return _Names(context.config.attributes["fastpgcache"], op.get_bind().dialect)


# Every public function starts here: the caller must hold p_user's secret and be acting as p_user
# now. NULL (nothing written) otherwise; the client then re-reads its secret once and retries.
# The role the caller acts as: the one set by SET ROLE, else the login. Inside another role's SECURITY
# DEFINER function this is still the session's role, not that function's owner.
# A searched CASE: Citus deparses a simple one (CASE x WHEN ...) wrongly for its shards ("text = boolean").
_ACTING = "(CASE WHEN current_setting('role') = 'none' THEN session_user::text ELSE current_setting('role') END)"

_VERIFY = """
    IF p_user IS DISTINCT FROM """ + _ACTING + """ THEN
        RETURN NULL;
    END IF;
    SELECT s.channel INTO v_channel FROM {secrets} AS s WHERE s.user_id = p_user AND s.secret = p_secret;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT t.max_value_bytes, t.quota_entries IS NOT NULL OR t.quota_bytes IS NOT NULL
      INTO v_max_value, v_quota FROM {settings} AS t;"""

_DECLARE = """
    v_channel text;
    v_max_value integer;
    v_quota boolean;
    v_now timestamptz := now();
    v_old bigint;"""

_SIZE_CHECK = """
    IF octet_length(p_key) > {MAX_KEY_BYTES} THEN
        RAISE EXCEPTION 'key is % bytes; the limit is {MAX_KEY_BYTES} bytes', octet_length(p_key)
              USING ERRCODE = 'FC001';
    END IF;
    IF octet_length(p_value) > v_max_value THEN
        RAISE EXCEPTION 'value is % bytes; this cache takes at most % bytes per value', octet_length(p_value),
              v_max_value USING ERRCODE = 'FC001',
              HINT = 'the admin sets the limit: fastpgcache-admin --max-value-bytes';
    END IF;"""

# A key that is new to the table is announced on the role's channel, unless the queue is filling up.
_ANNOUNCE_ONE = """
    IF pg_notification_queue_usage() < {QUEUE_LIMIT} THEN
        PERFORM pg_notify(v_channel, left(encode(sha256(p_secret || convert_to(p_key, 'UTF8')), 'hex'), 16));
    END IF;"""

_HEADER = ("RETURNS {returns} LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$\n"
           "DECLARE")


def _expire_rows_of(user: str, removed: str, indent: int = 4) -> str:
    """plpgsql removing up to p_batch of `user`'s expired rows (their count into `removed`, their bytes into
    v_bytes), kept in the quota's count: the body shared by a role's expiry batch and the owner's cleanup."""
    block = """IF v_quota THEN
    PERFORM {hold}(USER, '{{}}');
END IF;
SELECT {batch_keys} INTO v_keys FROM (
    SELECT e.key FROM {cache} AS e WHERE e.user_id = USER AND e.expires_at <= v_now LIMIT p_batch) AS e;
WITH gone AS (
    DELETE FROM {cache} AS c WHERE c.user_id = USER AND c.key = ANY (v_keys) AND c.expires_at <= v_now
    RETURNING octet_length(c.key) + octet_length(c.value) AS size)
SELECT count(*), coalesce(sum(g.size), 0) INTO REMOVED, v_bytes FROM gone AS g;
IF v_quota THEN
    PERFORM {charge}(USER, -REMOVED, -v_bytes, v_now);
END IF;
"""
    return textwrap.indent(block.replace("USER", user).replace("REMOVED", removed), " " * indent)


_FUNCTIONS = {
    # While a quota is set, every write of a role first locks the role's usage row, so its writes
    # take turns and the sizes they read stay exact; returns the current bytes of p_keys.
    "hold": ("(p_user text, p_keys text[])", "bigint", """
BEGIN
    INSERT INTO {usage} AS u (user_id) VALUES (p_user) ON CONFLICT (user_id) DO NOTHING;
    PERFORM FROM {usage} AS u WHERE u.user_id = p_user FOR UPDATE;
    RETURN coalesce((SELECT sum(octet_length(c.key) + octet_length(c.value)) FROM {cache} AS c
                      WHERE c.user_id = p_user AND c.key = ANY (p_keys)), 0);
END"""),
    # Adds a write's change to the role's usage. Past a quota, the role's expired rows give way
    # first; if that is not enough the write fails (FC002) and, raised, changes nothing.
    "charge": ("(p_user text, p_entries bigint, p_bytes bigint, p_now timestamptz)", "void", """
    v_entries bigint;
    v_bytes bigint;
    v_quota_entries bigint;
    v_quota_bytes bigint;
    v_freed bigint;
    v_freed_bytes bigint;
    v_keys text[];
BEGIN
    UPDATE {usage} AS u SET entries = u.entries + p_entries, bytes = u.bytes + p_bytes
     WHERE u.user_id = p_user RETURNING u.entries, u.bytes INTO v_entries, v_bytes;
    SELECT t.quota_entries, t.quota_bytes INTO v_quota_entries, v_quota_bytes FROM {settings} AS t;
    IF (p_entries > 0 AND v_entries > v_quota_entries) OR (p_bytes > 0 AND v_bytes > v_quota_bytes) THEN
        SELECT {batch_keys} INTO v_keys FROM (
            SELECT e.key FROM {cache} AS e WHERE e.user_id = p_user AND e.expires_at <= p_now LIMIT 1000) AS e;
        WITH gone AS (
            DELETE FROM {cache} AS c WHERE c.user_id = p_user AND c.key = ANY (v_keys) AND c.expires_at <= p_now
            RETURNING octet_length(c.key) + octet_length(c.value) AS size)
        SELECT count(*), coalesce(sum(gone.size), 0) INTO v_freed, v_freed_bytes FROM gone;
        UPDATE {usage} AS u SET entries = u.entries - v_freed, bytes = u.bytes - v_freed_bytes
         WHERE u.user_id = p_user RETURNING u.entries, u.bytes INTO v_entries, v_bytes;
        IF (p_entries > 0 AND v_entries > v_quota_entries) OR (p_bytes > 0 AND v_bytes > v_quota_bytes) THEN
            RAISE EXCEPTION 'quota exceeded: this role would hold % entries and % bytes; '
                            'its quota is % entries and % bytes',
                  v_entries, v_bytes, coalesce(v_quota_entries::text, 'any'), coalesce(v_quota_bytes::text, 'any')
                  USING ERRCODE = 'FC002',
                        HINT = 'delete or expire entries, or ask the admin to raise the quota '
                               '(fastpgcache-admin --quota-entries/--quota-bytes)';
        END IF;
    END IF;
END"""),
    # Keyed hashes of newly inserted keys, in messages under the payload limit; "reset" past MOST.
    "announce": ("(p_channel text, p_secret bytea, p_keys text[])", "void", """
    v_tokens text;
    v_start integer;
BEGIN
    IF cardinality(p_keys) = 0 OR pg_notification_queue_usage() >= {QUEUE_LIMIT} THEN
        RETURN;
    END IF;
    IF cardinality(p_keys) > {MOST} THEN
        PERFORM pg_notify(p_channel, 'reset');
        RETURN;
    END IF;
    SELECT string_agg(left(encode(sha256(p_secret || convert_to(k, 'UTF8')), 'hex'), 16), ' ')
      INTO v_tokens FROM unnest(p_keys) AS k;
    FOR v_start IN 0 .. length(v_tokens) - 1 BY {CHUNK} LOOP
        PERFORM pg_notify(p_channel, substr(v_tokens, v_start + 1, {CHUNK} - 1));
    END LOOP;
END"""),
    # A role's first write creates its secret (the column's random default), for the role it acts as only.
    "enroll": ("()", "void", """
    v_me text := """ + _ACTING + """;
BEGIN
    INSERT INTO {secrets} AS s (user_id) VALUES (v_me) ON CONFLICT (user_id) DO NOTHING;
END"""),
    # Django's MAX_ENTRIES/CULL_FREQUENCY, for the role's rows: a write that finds more than p_max
    # entries first removes the expired ones, then 1/p_frequency of the rest, oldest first (0: all).
    "cull": ("(p_user text, p_max bigint, p_frequency integer, p_now timestamptz, p_quota boolean)", "void", """
    v_count bigint;
    v_keys text[];
    v_removed bigint;
    v_bytes bigint;
BEGIN
    SELECT count(*) INTO v_count FROM {cache} AS c WHERE c.user_id = p_user;
    IF v_count <= p_max THEN
        RETURN;
    END IF;
    IF p_frequency = 0 THEN
        SELECT {batch_keys} INTO v_keys FROM {cache} AS e WHERE e.user_id = p_user;
    ELSE
        SELECT {batch_keys} INTO v_keys FROM {cache} AS e WHERE e.user_id = p_user AND e.expires_at <= p_now;
        IF v_count - cardinality(v_keys) > p_max THEN
            SELECT v_keys || {batch_keys} INTO v_keys FROM (
                SELECT e.key FROM {cache} AS e WHERE e.user_id = p_user AND NOT e.key = ANY (v_keys)
                 ORDER BY e.created_at, e.key LIMIT (v_count - cardinality(v_keys)) / p_frequency) AS e;
        END IF;
    END IF;
    WITH gone AS (
        DELETE FROM {cache} AS c WHERE c.user_id = p_user AND c.key = ANY (v_keys)
        RETURNING octet_length(c.key) + octet_length(c.value) AS size)
    SELECT count(*), coalesce(sum(g.size), 0) INTO v_removed, v_bytes FROM gone AS g;
    IF p_quota THEN
        PERFORM {charge}(p_user, -v_removed, -v_bytes, p_now);
    END IF;
END"""),
    # p_mode 0: always; 1: only if absent or expired (nx); 2: only if present and live (xx).
    "set": ("(p_user text, p_secret bytea, p_key text, p_value bytea, p_flags smallint, "
            "p_ttl double precision, p_mode smallint, p_cull_max bigint, p_cull_frequency integer)", "boolean",
            _DECLARE + """
    v_expires timestamptz;
    v_inserted boolean := false;
    v_stored boolean;
BEGIN""" + _VERIFY + _SIZE_CHECK + """
    IF p_ttl IS NOT NULL THEN
        v_expires := v_now + p_ttl * interval '1 second';
    END IF;
    IF v_quota THEN
        v_old := {hold}(p_user, ARRAY[p_key]);
    END IF;
    IF p_cull_max IS NOT NULL THEN
        PERFORM {cull}(p_user, p_cull_max, p_cull_frequency, v_now, v_quota);
        IF v_quota THEN
            v_old := {hold}(p_user, ARRAY[p_key]);  -- the culled key, if it was one, is gone
        END IF;
    END IF;
    IF p_mode = 2 THEN
        UPDATE {cache} AS c SET value = p_value, flags = p_flags, expires_at = v_expires, created_at = v_now
         WHERE c.user_id = p_user AND c.key = p_key AND (c.expires_at IS NULL OR c.expires_at > v_now);
        v_stored := FOUND;
    ELSE
        INSERT INTO {cache} AS c (user_id, key, value, flags, expires_at, created_at)
        VALUES (p_user, p_key, p_value, p_flags, v_expires, v_now)
        ON CONFLICT (user_id, key) DO UPDATE
           SET value = excluded.value, flags = excluded.flags, expires_at = excluded.expires_at,
               created_at = excluded.created_at
         WHERE p_mode = 0 OR c.expires_at <= v_now
        RETURNING c.xmax = 0 INTO v_inserted;
        v_stored := FOUND;
    END IF;
    IF v_stored AND v_quota THEN
        PERFORM {charge}(p_user, v_inserted::integer, octet_length(p_key) + octet_length(p_value) - v_old, v_now);
    END IF;
    IF v_inserted THEN""" + _ANNOUNCE_ONE + """
    END IF;
    RETURN v_stored;
END"""),
    "set_many": ("(p_user text, p_secret bytea, p_keys text[], p_values bytea[], p_flags smallint[], "
                 "p_ttl double precision, p_cull_max bigint, p_cull_frequency integer)", "integer", _DECLARE + """
    v_expires timestamptz;
    v_count integer;
    v_fresh text[];
    v_bytes bigint;
    v_too_big bigint;
BEGIN""" + _VERIFY + """
    IF cardinality(p_keys) <> cardinality(p_values) OR cardinality(p_keys) <> cardinality(p_flags) THEN
        RAISE EXCEPTION 'set_many needs as many values and flags as keys' USING ERRCODE = '22023';
    END IF;
    SELECT max(octet_length(k)) INTO v_too_big FROM unnest(p_keys) AS k;
    IF v_too_big > {MAX_KEY_BYTES} THEN
        RAISE EXCEPTION 'key is % bytes; the limit is {MAX_KEY_BYTES} bytes', v_too_big USING ERRCODE = 'FC001';
    END IF;
    SELECT max(octet_length(v)) INTO v_too_big FROM unnest(p_values) AS v;
    IF v_too_big > v_max_value THEN
        RAISE EXCEPTION 'value is % bytes; this cache takes at most % bytes per value', v_too_big, v_max_value
              USING ERRCODE = 'FC001', HINT = 'the admin sets the limit: fastpgcache-admin --max-value-bytes';
    END IF;
    IF p_ttl IS NOT NULL THEN
        v_expires := v_now + p_ttl * interval '1 second';
    END IF;
    IF v_quota THEN
        v_old := {hold}(p_user, p_keys);
    END IF;
    IF p_cull_max IS NOT NULL THEN
        PERFORM {cull}(p_user, p_cull_max, p_cull_frequency, v_now, v_quota);
        IF v_quota THEN
            v_old := {hold}(p_user, p_keys);
        END IF;
    END IF;
    WITH written AS (
        INSERT INTO {cache} AS c (user_id, key, value, flags, expires_at, created_at)
        SELECT p_user, b.k, b.v, b.f, v_expires, v_now FROM unnest(p_keys, p_values, p_flags) AS b (k, v, f)
        ON CONFLICT (user_id, key) DO UPDATE
           SET value = excluded.value, flags = excluded.flags, expires_at = excluded.expires_at,
               created_at = excluded.created_at
        RETURNING c.key, c.xmax = 0 AS fresh, octet_length(c.key) + octet_length(c.value) AS size)
    SELECT count(*), coalesce(array_agg(w.key) FILTER (WHERE w.fresh), '{{}}'), coalesce(sum(w.size), 0)
      INTO v_count, v_fresh, v_bytes FROM written AS w;
    IF v_quota THEN
        PERFORM {charge}(p_user, cardinality(v_fresh), v_bytes - v_old, v_now);
    END IF;
    PERFORM {announce}(v_channel, p_secret, v_fresh);
    RETURN v_count;
END"""),
    # Returns how many of p_keys held a live value.
    "delete": ("(p_user text, p_secret bytea, p_keys text[])", "integer", _DECLARE + """
    v_live integer;
    v_count bigint;
    v_bytes bigint;
BEGIN""" + _VERIFY + """
    IF v_quota THEN
        PERFORM {hold}(p_user, '{{}}');
    END IF;
    WITH gone AS (
        DELETE FROM {cache} AS c WHERE c.user_id = p_user AND c.key = ANY (p_keys)
        RETURNING c.expires_at IS NULL OR c.expires_at > v_now AS live,
                  octet_length(c.key) + octet_length(c.value) AS size)
    SELECT count(*) FILTER (WHERE g.live), count(*), coalesce(sum(g.size), 0) INTO v_live, v_count, v_bytes
      FROM gone AS g;
    IF v_quota THEN
        PERFORM {charge}(p_user, -v_count, -v_bytes, v_now);
    END IF;
    RETURN v_live;
END"""),
    # A new ttl for a live key; p_ttl NULL removes the ttl (persist: only from a key that had one).
    "expire": ("(p_user text, p_secret bytea, p_key text, p_ttl double precision)", "boolean", _DECLARE + """
BEGIN""" + _VERIFY + """
    IF p_ttl IS NULL THEN
        UPDATE {cache} AS c SET expires_at = NULL
         WHERE c.user_id = p_user AND c.key = p_key AND c.expires_at > v_now;
    ELSE
        UPDATE {cache} AS c SET expires_at = v_now + p_ttl * interval '1 second'
         WHERE c.user_id = p_user AND c.key = p_key AND (c.expires_at IS NULL OR c.expires_at > v_now);
    END IF;
    RETURN FOUND;
END"""),
    # Adds p_amount to a canonical decimal integer (as Redis: no sign but '-', no leading zeros or
    # blanks); a missing or expired key starts at 0 with no ttl unless p_create is false.
    # Returns {} for a key left missing, {n} for the new value; 22P02 if the value is no integer.
    "incr": ("(p_user text, p_secret bytea, p_key text, p_amount bigint, p_create boolean)", "bigint[]",
             _DECLARE + """
    v_value bytea;
    v_flags smallint;
    v_expires timestamptz;
    v_text text;
    v_result bigint;
BEGIN""" + _VERIFY + """
    IF octet_length(p_key) > {MAX_KEY_BYTES} THEN
        RAISE EXCEPTION 'key is % bytes; the limit is {MAX_KEY_BYTES} bytes', octet_length(p_key)
              USING ERRCODE = 'FC001';
    END IF;
    IF v_quota THEN
        v_old := {hold}(p_user, ARRAY[p_key]);
    END IF;
    LOOP
        SELECT c.value, c.flags, c.expires_at INTO v_value, v_flags, v_expires FROM {cache} AS c
         WHERE c.user_id = p_user AND c.key = p_key FOR UPDATE;
        IF FOUND THEN
            IF v_expires <= v_now THEN
                IF NOT p_create THEN
                    RETURN '{{}}';
                END IF;
                v_result := p_amount;
                v_flags := 2;
                v_expires := NULL;
            ELSE
                v_text := CASE WHEN v_flags IN (1, 2) THEN convert_from(v_value, 'UTF8') END;
                IF v_text IS NULL OR v_text !~ '^(0|-?[1-9][0-9]{{0,18}})$' OR (v_flags = 1 AND NOT p_create) THEN
                    RAISE EXCEPTION 'value is not an integer' USING ERRCODE = '22P02';
                END IF;
                v_result := v_text::bigint + p_amount;
            END IF;
            v_value := convert_to(v_result::text, 'UTF8');
            UPDATE {cache} AS c SET value = v_value, flags = v_flags, expires_at = v_expires
             WHERE c.user_id = p_user AND c.key = p_key;
            IF v_quota THEN
                PERFORM {charge}(p_user, 0, octet_length(p_key) + octet_length(v_value) - v_old, v_now);
            END IF;
            RETURN ARRAY[v_result];
        END IF;
        IF NOT p_create THEN
            RETURN '{{}}';
        END IF;
        v_value := convert_to(p_amount::text, 'UTF8');
        INSERT INTO {cache} AS c (user_id, key, value, flags, expires_at, created_at)
        VALUES (p_user, p_key, v_value, 2, NULL, v_now) ON CONFLICT (user_id, key) DO NOTHING;
        IF FOUND THEN
            IF v_quota THEN
                PERFORM {charge}(p_user, 1, octet_length(p_key) + octet_length(v_value), v_now);
            END IF;""" + _ANNOUNCE_ONE + """
            RETURN ARRAY[p_amount];
        END IF;
        -- another transaction inserted the key meanwhile: read it again, now it exists
    END LOOP;
END"""),
    # Every entry of the role, or those whose key matches p_regex; returns how many.
    "clear": ("(p_user text, p_secret bytea, p_regex text)", "bigint", _DECLARE + """
    v_count bigint;
    v_bytes bigint;
BEGIN""" + _VERIFY + """
    IF v_quota THEN
        PERFORM {hold}(p_user, '{{}}');
    END IF;
    WITH gone AS (
        DELETE FROM {cache} AS c WHERE c.user_id = p_user AND (p_regex IS NULL OR c.key ~ p_regex)
        RETURNING octet_length(c.key) + octet_length(c.value) AS size)
    SELECT count(*), coalesce(sum(g.size), 0) INTO v_count, v_bytes FROM gone AS g;
    IF v_quota THEN
        PERFORM {charge}(p_user, -v_count, -v_bytes, v_now);
    END IF;
    RETURN v_count;
END"""),
    # Up to p_batch of the role's expired rows; one batch per role at a time (the role's own secrets
    # row is the mutex: no other role can lock it). p_skip_locked: give up instead of waiting.
    "expire_batch": ("(p_user text, p_secret bytea, p_batch integer, p_skip_locked boolean)", "integer",
                     _DECLARE + """
    v_count integer;
    v_bytes bigint;
    v_keys text[];
BEGIN""" + _VERIFY + """
    IF p_skip_locked THEN
        PERFORM FROM {secrets} AS s WHERE s.user_id = p_user FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN 0;
        END IF;
    ELSE
        PERFORM FROM {secrets} AS s WHERE s.user_id = p_user FOR NO KEY UPDATE;
    END IF;
""" + _expire_rows_of("p_user", "v_count") + """    RETURN v_count;
END"""),
    # max_entries on the client: up to p_batch of the role's entries older than its newest p_keep.
    "trim": ("(p_user text, p_secret bytea, p_keep bigint, p_batch integer)", "integer", _DECLARE + """
    v_count integer;
    v_bytes bigint;
    v_keys text[];
    v_cutoff timestamptz;
BEGIN""" + _VERIFY + """
    IF v_quota THEN
        PERFORM {hold}(p_user, '{{}}');
    END IF;
    -- Keys first, then deleted by key; a key rewritten meanwhile is newer than the cutoff and stays.
    SELECT {batch_keys}, max(e.created_at) INTO v_keys, v_cutoff FROM (
        SELECT e.key, e.created_at FROM {cache} AS e WHERE e.user_id = p_user
         ORDER BY e.created_at DESC OFFSET p_keep LIMIT p_batch) AS e;
    IF v_cutoff IS NULL THEN
        RETURN 0;  -- nothing past p_keep (Citus also fails a DELETE whose WHERE folds to NULL)
    END IF;
    WITH gone AS (
        DELETE FROM {cache} AS c WHERE c.user_id = p_user AND c.key = ANY (v_keys) AND c.created_at <= v_cutoff
        RETURNING octet_length(c.key) + octet_length(c.value) AS size)
    SELECT count(*), coalesce(sum(g.size), 0) INTO v_count, v_bytes FROM gone AS g;
    IF v_quota THEN
        PERFORM {charge}(p_user, -v_count, -v_bytes, v_now);
    END IF;
    RETURN v_count;
END"""),
    # get_or_set's stampede lock: an expired placeholder row, uncommitted until the value is stored.
    # Another caller's claim of the same key waits on it in the unique index (bounded by its
    # lock_timeout), then finds the stored value and returns false. Only this role's own claims
    # can ever conflict: there is no lock id for another role to see, take or hold.
    "claim": ("(p_user text, p_secret bytea, p_key text)", "boolean", _DECLARE + """
    v_inserted boolean;
BEGIN""" + _VERIFY + """
    IF octet_length(p_key) > {MAX_KEY_BYTES} THEN
        RAISE EXCEPTION 'key is % bytes; the limit is {MAX_KEY_BYTES} bytes', octet_length(p_key)
              USING ERRCODE = 'FC001';
    END IF;
    IF v_quota THEN
        v_old := {hold}(p_user, ARRAY[p_key]);
    END IF;
    INSERT INTO {cache} AS c (user_id, key, value, flags, expires_at, created_at)
    VALUES (p_user, p_key, '', 0, v_now, v_now)
    ON CONFLICT (user_id, key) DO UPDATE SET created_at = excluded.created_at WHERE c.expires_at <= v_now
    RETURNING c.xmax = 0 INTO v_inserted;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_inserted THEN
        IF v_quota THEN
            PERFORM {charge}(p_user, 1, octet_length(p_key), v_now);
        END IF;""" + _ANNOUNCE_ONE + """
    END IF;
    RETURN true;
END"""),
    # The owner's cleanup of every role's expired rows, a bounded batch per call.
    "cleanup_all": ("(p_batch integer)", "bigint", """
    v_now timestamptz := now();
    v_user text;
    v_count bigint := 0;
    v_removed bigint;
    v_bytes bigint;
    v_quota boolean;
    v_keys text[];
BEGIN
    SELECT t.quota_entries IS NOT NULL OR t.quota_bytes IS NOT NULL INTO v_quota FROM {settings} AS t;
    FOR v_user IN SELECT DISTINCT e.user_id
                    FROM (SELECT d.user_id FROM {cache} AS d WHERE d.expires_at <= v_now LIMIT p_batch) AS e LOOP
""" + _expire_rows_of("v_user", "v_removed", indent=8) + """        v_count := v_count + v_removed;
    END LOOP;
    RETURN v_count;
END"""),
}


# get_many's batch of keys, from the text of an array literal. IMMUTABLE, so the planner computes the array
# before planning (a cast of text to text[] stays an expression until execution): on Citus the query then
# goes only to the shards of those keys (at 32 shards, get_many of 5 keys 0.7 ms instead of 3.9 ms).
# Its SET clause keeps it from being inlined back into that cast.
_READ_FUNCTIONS = {
    "key_array": ("(p_keys text)", "text[] LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE "
                  "SET search_path = pg_catalog, pg_temp AS $body$ SELECT CAST(p_keys AS text[]) $body$"),
}


def function_statements(names: _Names) -> list[str]:
    """CREATE FUNCTION statements of every write function, helpers first, then the reads' functions."""
    statements = []
    for verb in INTERNAL_ROUTINES + PUBLIC_ROUTINES:
        arguments, returns, body = _FUNCTIONS[verb]
        statements.append(names.sql(f"CREATE FUNCTION {{{verb}}}{arguments} "
                                    + _HEADER.format(returns=returns) + body + "\n$body$"))
    for verb in READ_ROUTINES:
        arguments, definition = _READ_FUNCTIONS[verb]
        statements.append(f"CREATE FUNCTION {getattr(names, verb)}{arguments} RETURNS {definition}")
    return statements


def _function_signatures(names: _Names, verbs) -> list[str]:
    return [f"{getattr(names, verb)}{(_FUNCTIONS.get(verb) or _READ_FUNCTIONS[verb])[0]}" for verb in verbs]


def _ensure_owner(names: _Names) -> None:
    # The owner role exists (created NOLOGIN if need be) and the admin running this may act as it.
    bind = op.get_bind()
    role = names.options.owner
    exists = bind.execute(text("SELECT rolcanlogin FROM pg_roles WHERE rolname = :r"), {"r": role}).first()
    if exists is None:
        run_ddl(bind, f"CREATE ROLE {names.owner} NOLOGIN")
    elif exists.rolcanlogin and not (names.options.distributed or owner_serves_citus(bind, role)
                                     or citus_manages_login(bind, role)):
        # On Citus the owner logs in for the nodes' connections, with a password only Citus holds (distributed.py).
        raise RuntimeError(f"the owner role {role} can log in; it must be NOLOGIN (ALTER ROLE {role} NOLOGIN), "
                           "since whoever logs in as the owner bypasses row-level security")
    superuser = bind.execute(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    if not superuser and not bind.execute(text("SELECT pg_has_role(current_user, :r, 'MEMBER')"),
                                          {"r": role}).scalar():
        run_ddl(bind, f"GRANT {names.owner} TO CURRENT_USER")


def upgrade() -> None:
    names = _names()
    options = names.options
    bind = op.get_bind()
    def run(statement):  # role names may hold '%', and the functions' RAISE formats do
        run_ddl(bind, statement)

    grantees = readers(bind, options) or ["PUBLIC"]
    _ensure_owner(names)
    trigger = options.quote(bind.dialect, f"{options.table}_notify_insert")
    run(f"DROP TRIGGER IF EXISTS {trigger} ON {names.cache}")
    run(f"DROP FUNCTION IF EXISTS {names.schema}.{trigger}()")
    for table in (secrets_table(options.table), settings_table(options.table), usage_table(options.table)):
        table.to_metadata(MetaData(), schema=options.schema).create(bind)
    # The secrets live and die with the entries: beside an UNLOGGED table they are UNLOGGED too, so the
    # row lock that keeps expiry batches one per role writes no WAL (each batch waited for a WAL flush:
    # 0.46 ms against 0.32 ms on PostgreSQL 15 with fsync on). After a crash both come back empty and
    # each role enrolls again at its next write.
    if bind.execute(text(f"SELECT relpersistence FROM pg_catalog.pg_class WHERE oid = '{names.cache}'::regclass")
                    ).scalar() == "u":
        run(f"ALTER TABLE {names.secrets} SET UNLOGGED")
    run(f"INSERT INTO {names.settings} (max_value_bytes) VALUES ({DEFAULT_MAX_VALUE_BYTES})")
    # The entry table's policy again, with its operator named in pg_catalog: one created by an older
    # setup was resolved on whatever search path that admin had.
    policy = options.quote(bind.dialect, options.table + "_own_rows")
    run(f"DROP POLICY IF EXISTS {policy} ON {names.cache}")
    run(f"CREATE POLICY {policy} ON {names.cache} USING (user_id OPERATOR(pg_catalog.=) current_user)"
        f" WITH CHECK (user_id OPERATOR(pg_catalog.=) current_user)")
    for table in (names.secrets, names.usage):
        # Each role sees (and may enroll) only its own secret and usage.
        run(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        policy = options.quote(bind.dialect, table.split(".")[-1].strip('"') + "_own_rows")
        run(f"CREATE POLICY {policy} ON {table} USING (user_id OPERATOR(pg_catalog.=) current_user)"
            f" WITH CHECK (user_id OPERATOR(pg_catalog.=) current_user)")
    for statement in function_statements(names):
        run(statement)
    for relation in (names.cache, names.secrets, names.settings, names.usage):
        run(f"ALTER TABLE {relation} OWNER TO {names.owner}")
    for signature in _function_signatures(names, INTERNAL_ROUTINES + PUBLIC_ROUTINES + READ_ROUTINES):
        run(f"ALTER FUNCTION {signature} OWNER TO {names.owner}")
    for statement in privilege_statements(bind, options, grantees):
        run(statement)


def downgrade() -> None:
    names = _names()
    bind = op.get_bind()
    def run(statement):
        run_ddl(bind, statement)

    grantees = readers(bind, names.options)
    for signature in _function_signatures(names, PUBLIC_ROUTINES + INTERNAL_ROUTINES + READ_ROUTINES):
        run(f"DROP FUNCTION IF EXISTS {signature}")
    for relation in (names.secrets, names.settings, names.usage):
        run(f"DROP TABLE IF EXISTS {relation}")
    if distribution_of(bind, names.options.schema, names.options.table)[names.options.table] is not None:
        # Revision 0002's trigger cannot live on a Citus table: the rows come back to this node first.
        bind.execute(text("SELECT pg_catalog.undistribute_table(:t)"), {"t": names.cache})
    release_owner_login(bind, names.options.owner)
    if not bind.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": names.cache}).scalar():
        return  # setup repairs a table dropped by hand by downgrading what is left
    run(f"ALTER TABLE {names.cache} OWNER TO CURRENT_USER")
    for grantee in grantees:  # the privileges of revision 0003
        run(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {names.cache} TO {grantee}")
    context.script.get_revision("0002_insert_notify_trigger").module.upgrade()
