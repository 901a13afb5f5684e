"""Setting up, converting, checking, forcing, upgrading and cleaning a cache table distributed by Citus, on a
real coordinator with two workers; and the owner role's logins, which Citus needs and nobody else gets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from fastpgcache import Cache, CacheError, setup_cache
from fastpgcache.admin import cache_status, head_revision, main
from fastpgcache.distributed import DELEGATED_VERBS, scram_verifier

ROOT = Path(__file__).resolve().parent.parent
citus = pytest.mark.citus
own_server = pytest.mark.own_server


def _url(url) -> str:
    return url if isinstance(url, str) else url.render_as_string(hide_password=False)


def _scalar(url, sql: str, **params):
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def _placement(citus, schema: str, table: str = "cache") -> dict:
    # {worker port: [relpersistence of each shard there]} read on the workers themselves.
    found = {}
    for url in citus.worker_urls:
        engine = create_engine(url)
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SET citus.override_table_visibility = off")
                found[make_url(url).port] = sorted(connection.execute(text(
                    "SELECT c.relpersistence FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = :s AND c.relname ~ ('^' || :t || '_[0-9]+$') AND c.relkind = 'r'"),
                    {"s": schema, "t": table}).scalars())
        finally:
            engine.dispose()
    return found


@pytest.fixture
def fresh_schema(citus_admin):
    made = []

    def make():
        made.append(f"c_{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    with citus_admin.begin() as connection:
        for name in made:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def owner(citus_admin):
    """An owner role of the test's own, so its LOGIN and pg_dist_authinfo rows are the test's alone."""
    name = f"own_{uuid.uuid4().hex[:8]}"
    yield name
    with citus_admin.begin() as connection:
        connection.execute(text("DELETE FROM pg_dist_authinfo WHERE rolename = :r"), {"r": name})
        connection.execute(text("SELECT run_command_on_workers(format("
                                "'DELETE FROM pg_dist_authinfo WHERE rolename = %L', CAST(:r AS text)))"), {"r": name})


# -- setup, check, convert ----------------------------------------------------------------------

@citus
@own_server
def test_setup_distributes_on_key_with_reference_companions_and_delegated_functions(citus, citus_admin, fresh_schema,
                                                                                     capsys):
    schema = fresh_schema()
    assert main(["--url", citus.coordinator_url, "--schema", schema, "--distributed", "--shard-count", "6"]) == 0
    assert "distributed on key, 6 shards, 2 workers" in capsys.readouterr().out
    assert main(["--url", citus.coordinator_url, "--schema", schema, "--check"]) == 0
    out = capsys.readouterr().out
    assert "  distributed on key, 6 shards, 2 workers\n" in out and "warning" not in out
    status = cache_status(citus_admin, schema)
    assert status["distribution"] == {"column": "key", "shards": 6, "workers": 2, "reference": False,
                                      "companions_are_reference_tables": True}
    assert status["owner_role"]["login"] is True and not status["problems"]
    # Every shard on the workers is UNLOGGED, 3 on each.
    assert {port: shards for port, shards in _placement(citus, schema).items()} == {
        make_url(url).port: ["u", "u", "u"] for url in citus.worker_urls}
    with citus_admin.connect() as connection:
        delegated = connection.execute(text(
            "SELECT p.proname FROM pg_dist_object o JOIN pg_proc p ON p.oid = o.objid"
            " WHERE o.classid = 'pg_proc'::regclass AND o.distribution_argument_index = 2"
            " AND p.pronamespace = CAST(:s AS regnamespace)"), {"s": schema}).scalars().all()
    assert sorted(delegated) == sorted(f"cache_{verb}" for verb in DELEGATED_VERBS)


@citus
@own_server
def test_converting_a_plain_table_keeps_its_rows_secrets_and_grants(citus, citus_admin, fresh_schema, citus_role):
    schema = fresh_schema()
    setup_cache(engine=citus_admin, schema=schema)
    _, urls = citus_role("convert")
    before = Cache(create_engine(urls["coordinator"]), schema=schema)
    before.set_many({f"k{i}": [i] for i in range(50)}, ttl=600)
    status = setup_cache(engine=citus_admin, schema=schema, distributed=True)
    assert status["distribution"]["column"] == "key" and status["distribution"]["shards"] == 32
    # The coordinator keeps no hidden copy of the rows; the role reads them through a worker as before.
    assert _scalar(citus.coordinator_url, f"SELECT pg_relation_size('\"{schema}\".cache')") == 0
    after = Cache(create_engine(urls["worker1"]), schema=schema)
    assert after.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": [i] for i in range(50)}
    assert after.ttl("k3") > 500
    # Its secret stayed: the identity the first client read still writes.
    assert before.set("k0", "again") and after.get("k0") == "again"
    before.bind.dispose()
    after.bind.dispose()


@citus
@own_server
def test_a_set_function_made_before_citus_arrived_is_replaced_by_one_citus_can_run(citus, citus_admin, fresh_schema,
                                                                                   citus_role):
    # Where Citus is missing, migration 0007 verifies the caller's secret inside the upsert's INSERT ... SELECT,
    # which Citus cannot plan; a database that gets Citus later still has that body until setup runs again.
    schema = fresh_schema()
    setup_cache(engine=citus_admin, schema=schema)
    signature = f'"{schema}".cache_set(text, bytea, text, bytea, smallint, double precision, smallint, bigint, integer)'
    function = f"CAST('{signature}' AS regprocedure)"
    citus_body = _scalar(citus.coordinator_url, f"SELECT prosrc FROM pg_proc WHERE oid = {function}")
    definition = _scalar(citus.coordinator_url, f"SELECT pg_get_functiondef({function})")
    plain = definition.replace("        VALUES (p_user, p_key, p_value, p_flags, v_expires, v_now)\n",
                               f'        SELECT p_user, p_key, p_value, p_flags, v_expires, v_now FROM "{schema}"'
                               ".cache_secrets AS s WHERE s.user_id = p_user AND s.secret = p_secret\n")
    assert plain != definition
    _scalar(citus.coordinator_url, plain)
    assert _scalar(citus.coordinator_url, f"SELECT prosrc FROM pg_proc WHERE oid = {function}") != citus_body
    status = setup_cache(engine=citus_admin, schema=schema, distributed=True)
    assert status["distribution"]["column"] == "key" and not status["problems"]
    assert _scalar(citus.coordinator_url, f"SELECT prosrc FROM pg_proc WHERE oid = {function}") == citus_body
    _, urls = citus_role("arrived")
    cache = Cache(create_engine(urls["worker0"]), schema=schema)
    assert cache.set("k", 1) is True and cache.set("k", 2, nx=True) is False and cache.get("k") == 1
    cache.bind.dispose()


@citus
@own_server
def test_rerun_force_shard_count_and_persistence_keep_it_distributed(citus, citus_admin, fresh_schema, citus_role,
                                                                     capsys):
    schema = fresh_schema()
    url = citus.coordinator_url
    assert main(["--url", url, "--schema", schema, "--distributed", "--shard-count", "4"]) == 0
    _, urls = citus_role("rerun")
    engine = create_engine(urls["worker0"])
    cache = Cache(engine, schema=schema)
    cache.set_many({f"k{i}": i for i in range(20)})
    assert main(["--url", url, "--schema", schema]) == 0  # no flag: stays as it is
    assert cache.get_many(["k1", "k19"]) == {"k1": 1, "k19": 19}
    assert main(["--url", url, "--schema", schema, "--shard-count", "8"]) == 0
    assert "distributed on key, 8 shards" in capsys.readouterr().out and cache.get("k7") == 7
    assert main(["--url", url, "--schema", schema, "--logged"]) == 0
    assert set(sum(_placement(citus, schema).values(), [])) == {"p"} and cache.get("k8") == 8
    assert main(["--url", url, "--schema", schema, "--unlogged"]) == 0
    assert set(sum(_placement(citus, schema).values(), [])) == {"u"} and cache.get("k9") == 9
    assert main(["--url", url, "--schema", schema, "--force"]) == 0
    assert "distributed on key, 8 shards, 2 workers" in capsys.readouterr().out
    # Forced: empty, with a new secret for every role; the client reads it again and carries on.
    cache = Cache(engine, schema=schema)
    assert cache.get("k1") is None and cache.set("k1", "new") and cache.get("k1") == "new"
    engine.dispose()


@citus
@own_server
def test_making_it_local_again_keeps_rows_and_takes_the_owner_s_login_back(citus, citus_admin, fresh_schema,
                                                                           citus_role, owner):
    schema = fresh_schema()
    setup_cache(engine=citus_admin, schema=schema, owner=owner, distributed=True, shard_count=4)
    on_every_node = [citus.coordinator_url, *citus.worker_urls]
    assert [_scalar(u, "SELECT count(*) FROM pg_dist_authinfo WHERE rolename = :r", r=owner) for u in on_every_node] \
        == [1, 1, 1]
    _, urls = citus_role("local")
    engine = create_engine(urls["coordinator"])
    Cache(engine, schema=schema).set_many({f"k{i}": i for i in range(10)})
    status = setup_cache(engine=citus_admin, schema=schema, owner=owner, distributed=False)
    assert status["distribution"] is None and status["owner_role"]["login"] is False and not status["warnings"]
    assert [_scalar(u, "SELECT count(*) FROM pg_dist_authinfo WHERE rolename = :r", r=owner) for u in on_every_node] \
        == [0, 0, 0]
    assert _scalar(citus.coordinator_url, "SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = :r", r=owner)
    assert Cache(engine, schema=schema).get_many(["k0", "k9"]) == {"k0": 0, "k9": 9}
    engine.dispose()


@citus
@own_server
def test_check_warns_when_citus_cannot_log_in_as_the_owner_and_setup_repairs_it(citus, citus_admin, fresh_schema,
                                                                               owner, capsys):
    schema = fresh_schema()
    url = citus.coordinator_url
    setup_cache(engine=citus_admin, schema=schema, owner=owner, distributed=True, shard_count=2)
    with citus_admin.begin() as connection:
        connection.execute(text(f'ALTER ROLE "{owner}" NOLOGIN'))
    assert main(["--url", url, "--schema", schema, "--owner", owner, "--check"]) == 0
    assert f"warning: the owner role {owner} cannot log in, so Citus cannot open its connections" in \
        capsys.readouterr().out
    assert main(["--url", url, "--schema", schema, "--owner", owner]) == 0
    status = cache_status(citus_admin, schema, owner=owner)
    assert status["owner_role"]["login"] is True and status["warnings"] == []


@citus
@own_server
def test_an_upgrade_through_a_new_revision_keeps_the_table_distributed(citus, citus_admin, fresh_schema, citus_role,
                                                                      tmp_path, monkeypatch):
    schema = fresh_schema()
    setup_cache(engine=citus_admin, schema=schema, distributed=True, shard_count=4)
    _, urls = citus_role("upgrade")
    engine = create_engine(urls["worker1"])
    Cache(engine, schema=schema).set_many({f"k{i}": i for i in range(10)})
    # A later release's revision, changing the table: the migrations of this checkout plus one.
    migrations = tmp_path / "alembic"
    shutil.copytree(ROOT / "alembic", migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / "0099_note.py").write_text('''
from alembic import context, op

revision = "0099_note"
down_revision = "HEAD"
branch_labels = None
depends_on = None


def upgrade():
    options = context.config.attributes["fastpgcache"]
    op.execute(f"ALTER TABLE {options.qualified_table(op.get_bind().dialect)} ADD COLUMN note text")


def downgrade():
    options = context.config.attributes["fastpgcache"]
    op.execute(f"ALTER TABLE {options.qualified_table(op.get_bind().dialect)} DROP COLUMN note")
'''.replace("HEAD", head_revision()))
    monkeypatch.setattr("fastpgcache.admin.migrations_dir", lambda: migrations)
    status = setup_cache(engine=citus_admin, schema=schema)
    assert status["revision"] == "0099_note" and status["distribution"]["shards"] == 4 and not status["problems"]
    with citus_admin.connect() as connection:
        columns = connection.execute(text(
            "SELECT result FROM run_command_on_shards(:t, $$SELECT count(*) FROM pg_attribute"
            " WHERE attrelid = '%s'::regclass AND attname = 'note'$$)"), {"t": f"{schema}.cache"}).scalars().all()
    assert columns == ["1"] * 4
    assert Cache(engine, schema=schema).get_many(["k0", "k9"]) == {"k0": 0, "k9": 9}
    engine.dispose()


@citus
@own_server
def test_alembic_upgrades_an_older_plain_table_and_distributes_it_with_its_rows(citus, citus_admin, fresh_schema):
    schema = fresh_schema()

    def alembic(*args):
        done = subprocess.run([sys.executable, "-m", "alembic", "-x", f"schema={schema}", *args], cwd=ROOT,
                              env={**os.environ, "FASTPGCACHE_URL": citus.coordinator_url},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    alembic("upgrade", "0003_fillfactor")  # what an older release left: a plain table with its trigger
    with citus_admin.begin() as connection:
        connection.execute(text(f"INSERT INTO \"{schema}\".cache (user_id, key, value) "
                                "SELECT 'someone', 'k' || i, 'v' FROM generate_series(1, 25) AS i"))
    alembic("-x", "distributed=true", "-x", "shard_count=4", "upgrade", "head")
    status = cache_status(citus_admin, schema)
    assert status["revision"] == head_revision() and status["distribution"]["shards"] == 4
    assert _scalar(citus.worker_urls[1], f'SELECT count(*) FROM "{schema}".cache') == 25
    alembic("downgrade", "0003_fillfactor")  # the trigger of 0003 cannot live on a Citus table: local again
    assert cache_status(citus_admin, schema)["distribution"] is None
    assert _scalar(citus.coordinator_url, f'SELECT count(*) FROM "{schema}".cache') == 25


@citus
@own_server
def test_cleanup_and_grant_to_on_a_distributed_table(citus, citus_admin, fresh_schema, citus_role, capsys):
    schema = fresh_schema()
    url = citus.coordinator_url
    assert main(["--url", url, "--schema", schema, "--distributed", "--shard-count", "4"]) == 0
    with citus_admin.begin() as connection:
        connection.execute(text(
            f"INSERT INTO \"{schema}\".cache (user_id, key, value, expires_at) SELECT u, 'k' || i, 'v',"
            " CASE WHEN i <= 15 THEN now() - interval '1 minute' END"
            " FROM unnest(ARRAY['alice', 'bob']) AS u, generate_series(1, 20) AS i"))
    assert main(["--url", url, "--schema", schema, "--cleanup"]) == 0
    assert f"removed 30 expired entries from {schema}.cache" in capsys.readouterr().out
    assert _scalar(url, f'SELECT count(*) FROM "{schema}".cache') == 10
    chosen, chosen_urls = citus_role("chosen")
    _, other_urls = citus_role("other")
    assert main(["--url", url, "--schema", schema, "--grant-to", chosen]) == 0
    engine = create_engine(chosen_urls["worker0"])
    assert Cache(engine, schema=schema).set("mine", 1) and Cache(engine, schema=schema).get("mine") == 1
    other = create_engine(other_urls["worker1"])
    with pytest.raises(CacheError, match="permission denied"):
        Cache(other, schema=schema).get("mine")
    engine.dispose()
    other.dispose()


def test_a_role_granted_use_of_a_cache_in_its_own_schema_can_write(engine, empty_schema, role_engine):
    # The functions run as the owner, which needs the schema's use even when PUBLIC loses it to --grant-to.
    name, granted = role_engine("granted")
    setup_cache(engine=engine, schema=empty_schema, grant_to=name)
    assert Cache(granted, schema=empty_schema).set("k", 1) and Cache(granted, schema=empty_schema).get("k") == 1


# -- what setup refuses ----------------------------------------------------------------------------

def test_distributed_needs_citus_and_says_so_in_one_line(engine, pg_url, empty_schema, capsys):
    with pytest.raises(CacheError, match="needs Citus, and this database has no citus extension"):
        setup_cache(engine=engine, schema=empty_schema, distributed=True)
    assert cache_status(engine, empty_schema)["exists"] is False  # one transaction: nothing left behind
    assert main(["--url", pg_url, "--schema", empty_schema, "--distributed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs Citus" in err


def test_shard_counts_are_checked_before_any_sql(capsys):
    for bad in (0, -1, 64001, 2.5, True, "8"):
        with pytest.raises(ValueError, match="shard_count must be an int from 1 to 64000"):
            setup_cache(url="postgresql://nobody@127.0.0.1:1/none", distributed=True, shard_count=bad)
    with pytest.raises(ValueError, match="a shard count applies to a distributed table only"):
        setup_cache(url="postgresql://nobody@127.0.0.1:1/none", distributed=False, shard_count=4)
    with pytest.raises(SystemExit):
        main(["--url", "postgresql://nobody@127.0.0.1:1/none", "--distributed", "--shard-count", "zero"])
    assert "must be a whole number from 1 to 64000, not 'zero'" in capsys.readouterr().err


@citus
@own_server
def test_setup_refuses_a_worker_and_a_shard_count_for_a_plain_table(citus, fresh_schema):
    schema = fresh_schema()
    assert main(["--url", citus.worker_urls[0], "--schema", schema, "--distributed"]) == 2
    with pytest.raises(CacheError, match="on the Citus coordinator, not on a worker"):
        setup_cache(url=citus.worker_urls[0], schema=schema, distributed=True)
    with pytest.raises(CacheError, match="a shard count applies to a distributed table only"):
        setup_cache(url=citus.coordinator_url, schema=schema, shard_count=4)


# -- the owner's logins ------------------------------------------------------------------------------

@citus
@own_server
def test_only_citus_can_log_in_as_the_owner(citus, citus_admin, fresh_schema, citus_role, owner, capsys):
    """With the nodes asking the owner for a password, Citus's own connections get in with the one setup made
    (never shown), a node that lacks it fails, setup gives it back; ordinary roles can neither read nor use it."""
    schema = fresh_schema()
    assert main(["--url", citus.coordinator_url, "--schema", schema, "--owner", owner, "--distributed",
                 "--shard-count", "4"]) == 0
    shown = capsys.readouterr()
    password = _scalar(citus.coordinator_url, "SELECT authinfo FROM pg_dist_authinfo WHERE rolename = :r", r=owner)
    assert password.startswith("password=") and password[9:] not in shown.out + shown.err
    assert password[9:] not in repr(cache_status(citus_admin, schema, owner=owner))
    verifiers = {_scalar(u, "SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=owner)
                 for u in [citus.coordinator_url, *citus.worker_urls]}
    assert len(verifiers) == 1 and verifiers.pop().startswith("SCRAM-SHA-256$4096:")
    hba = [node.data_dir / "pg_hba.conf" for node in citus.nodes]
    originals = [path.read_text() for path in hba]
    try:
        for path, original in zip(hba, originals, strict=True):
            path.write_text(f'host all "{owner}" 127.0.0.1/32 scram-sha-256\n' + original)
        for url in [citus.coordinator_url, *citus.worker_urls]:
            _scalar(url, "SELECT pg_reload_conf()")
        time.sleep(0.2)
        with pytest.raises(sa_exc.OperationalError, match="password authentication failed|no password"):
            create_engine(make_url(citus.coordinator_url).set(username=owner)).connect()
        name, urls = citus_role("writer")
        across = Cache(create_engine(urls["worker0"]), schema=schema, expire_every=None)
        assert across.set_many({f"k{i}": i for i in range(12)}) == 12  # worker0 writes worker1's shards as the owner
        assert Cache(create_engine(urls["coordinator"]), schema=schema).set("c", 1)
        _scalar(citus.worker_urls[0], "DELETE FROM pg_dist_authinfo WHERE rolename = :r RETURNING 1", r=owner)
        with pytest.raises(CacheError, match="password"):
            across.set_many({f"k{i}": -i for i in range(12)})
        setup_cache(engine=citus_admin, schema=schema, owner=owner)  # gives every worker the coordinator's row
        assert across.set_many({f"k{i}": -i for i in range(12)}) == 12
        # Ordinary roles see no password, and cannot become the owner.
        with create_engine(urls["coordinator"]).connect() as connection:
            with pytest.raises(sa_exc.ProgrammingError, match="permission denied"):
                connection.execute(text("SELECT authinfo FROM pg_dist_authinfo"))
        with create_engine(urls["coordinator"]).connect() as connection:
            with pytest.raises(sa_exc.ProgrammingError, match="permission denied to set role"):
                connection.execute(text(f'SET ROLE "{owner}"'))
    finally:
        for path, original in zip(hba, originals, strict=True):
            path.write_text(original)
        for url in [citus.coordinator_url, *citus.worker_urls]:
            _scalar(url, "SELECT pg_reload_conf()")


def test_scram_verifiers_are_what_postgresql_computes(engine, make_role):
    # Setup hands PostgreSQL the verifier, never the password: it must be the one PostgreSQL makes itself.
    import base64

    name, _ = make_role("scram")
    with engine.begin() as connection:
        connection.execute(text(f"SET LOCAL password_encryption = 'scram-sha-256'; "
                                f"ALTER ROLE \"{name}\" PASSWORD 's3cret!'"))
        stored = connection.execute(text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": name}).scalar()
    iterations, salt = stored.split("$")[1].split(":")
    assert scram_verifier("s3cret!", base64.b64decode(salt), int(iterations)) == stored


# -- adding a worker ----------------------------------------------------------------------------------

@citus
@own_server
def test_a_worker_added_later_gets_shards_by_block_writes_rebalancing_and_the_owner_s_login_at_setup():
    """A cluster of its own (coordinator + 1 worker), grown by one worker: UNLOGGED shards move with
    block_writes, setup gives the new worker the owner's login, and every call works through it."""
    from citus_cluster import CITUS_SETTINGS, CitusCluster, citus_available

    from fastpgcache.embedded import EmbeddedPostgres

    if not citus_available():
        pytest.skip("Citus is not built into this virtualenv's embedded PostgreSQL")
    with CitusCluster(workers=1) as small:
        admin = create_engine(small.coordinator_url)
        setup_cache(engine=admin, schema="grown", distributed=True, shard_count=4)
        with admin.begin() as connection:
            connection.execute(text("CREATE ROLE grower LOGIN"))
        old = create_engine(make_url(small.coordinator_url).set(username="grower"))
        Cache(old, schema="grown").set_many({f"k{i}": i for i in range(40)})
        added = EmbeddedPostgres(settings=CITUS_SETTINGS).start()
        try:
            _scalar(added.url, "CREATE EXTENSION citus")
            with admin.begin() as connection:
                connection.execute(text("SELECT citus_add_node('127.0.0.1', :p)"), {"p": added.port})
            assert main(["--url", small.coordinator_url, "--schema", "grown"]) == 0  # the owner's login, there too
            assert _scalar(added.url, "SELECT count(*) FROM pg_dist_authinfo") == 1
            with admin.connect() as connection:
                connection.execute(text("SELECT rebalance_table_shards(shard_transfer_mode => 'block_writes')"))
                connection.commit()
                spread = dict(connection.execute(text(
                    "SELECT nodeport, count(*) FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)"
                    " JOIN pg_dist_node n USING (groupid) WHERE s.logicalrelid = 'grown.cache'::regclass"
                    " GROUP BY nodeport")).all())
            assert spread == {small.workers[0].port: 2, added.port: 2}
            persistence = _scalar(added.url, "SET citus.override_table_visibility = off; SELECT string_agg("
                                             "DISTINCT relpersistence::text, '') FROM pg_class"
                                             " WHERE relname ~ '^cache_[0-9]+$'")
            assert persistence == "u"
            new = create_engine(make_url(added.url).set(username="grower"))
            through_new = Cache(new, schema="grown")
            assert through_new.get_many([f"k{i}" for i in range(40)]) == {f"k{i}": i for i in range(40)}
            assert through_new.set_many({f"k{i}": -i for i in range(40)}) == 40 and through_new.incr("n") == 1
            assert Cache(old, schema="grown").get("k39") == -39
            new.dispose()
        finally:
            old.dispose()
            admin.dispose()
            added.stop()
