"""What SQLAlchemy users hook into sees the cache's statements: echo, cursor and error listeners, OpenTelemetry."""
from __future__ import annotations

import logging

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session

from fastpgcache import Cache, CacheLimitError


@pytest.fixture
def watched_engine(pg_url):
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def _record_cursor_statements(engine) -> list:
    seen = []

    @event.listens_for(engine, "before_cursor_execute")
    def before(connection, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    return seen


@pytest.mark.parametrize("bind_kind", ["engine", "connection", "session"])
def test_a_cursor_listener_sees_every_cache_statement_on_every_bind(watched_engine, schema, bind_kind):
    seen = _record_cursor_statements(watched_engine)
    with watched_engine.connect() as connection, Session(watched_engine) as session:
        bind = {"engine": watched_engine, "connection": connection, "session": session}[bind_kind]
        cache = Cache(bind, schema=schema)
        cache.set("k", {"v": 1})
        assert cache.get("k") == {"v": 1}
        assert cache.incr("n") == 1
        if bind_kind != "engine":
            bind.commit()
    statements = [statement for statement, _ in seen]
    assert any(f"{schema}.cache_set(" in statement for statement in statements)
    assert any(f"{schema}.cache_incr(" in statement for statement in statements)
    get = next(statement for statement in statements if statement.startswith("SELECT") and "cache.value" in statement)
    assert "OPERATOR(pg_catalog.=)" in get
    parameters = next(parameters for statement, parameters in seen if statement == get)
    assert parameters["k"] == "k"  # the parameters SQLAlchemy passes to the driver


def test_echo_logs_the_statements_and_hide_parameters_hides_their_values(pg_url, schema, caplog):
    for hide in (False, True):
        engine = create_engine(pg_url, echo=True, hide_parameters=hide)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            Cache(engine, schema=schema).set("k", "a secret value")
        logged = "\n".join(record.getMessage() for record in caplog.records)
        assert f"{schema}.cache_set(" in logged
        assert (b"a secret value".hex() in logged) is not hide
        assert ("SQL parameters hidden" in logged) is hide
        engine.dispose()


def test_the_engine_logger_at_info_is_enough(pg_url, schema, caplog):
    engine = create_engine(pg_url)
    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        Cache(engine, schema=schema).get("k")
    assert any("cache.value" in record.getMessage() for record in caplog.records)
    engine.dispose()


def test_an_error_listener_hears_of_failures(watched_engine, schema):
    heard = []
    event.listen(watched_engine, "handle_error", lambda context: heard.append(context.sqlalchemy_exception))
    with pytest.raises(CacheLimitError):
        Cache(watched_engine, schema=schema).set("big", "x" * 2_000_000)
    assert len(heard) == 1 and "bytes per value" in str(heard[0].orig)


def test_nobody_listening_keeps_the_fast_path(engine, schema, monkeypatch):
    cache = Cache(engine, schema=schema)
    monkeypatch.setattr(Cache, "_execute_watched", lambda *args: pytest.fail("went through SQLAlchemy's execution"))
    cache.set("k", 1)
    assert cache.get("k") == 1


@pytest.mark.parametrize("bind_kind", ["engine", "session"])
def test_opentelemetry_spans_appear_for_cache_calls(watched_engine, schema, bind_kind):
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SQLAlchemyInstrumentor()
    # The package declares sqlalchemy < 2.1; its cursor events are the same in 2.1, as the spans show.
    instrumentor.instrument(engine=watched_engine, tracer_provider=provider, skip_dep_check=True)
    try:
        with Session(watched_engine) as session:
            cache = Cache(watched_engine if bind_kind == "engine" else session, schema=schema)
            cache.set("traced", 1)
            assert cache.get("traced") == 1
            if bind_kind == "session":
                session.commit()
        statements = [span.attributes.get("db.statement", "") for span in exporter.get_finished_spans()]
        assert any(f"{schema}.cache_set(" in statement for statement in statements), statements
        assert any("cache.value" in statement for statement in statements), statements
    finally:
        instrumentor.uninstrument()
