"""A Flask app caching an expensive view with Flask-Caching on fastpgcache, and
cache writes that commit or roll back with the request's Flask-SQLAlchemy transaction.

    python examples/flask_app.py                    # runs a few requests through the test client
    flask --app examples/flask_app.py run           # serves it

Uses FASTPGCACHE_URL, or a throwaway embedded PostgreSQL when it is not set.
"""
import os
import time

from flask import Blueprint, Flask, abort, request
from flask_caching import Cache as FlaskCache
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from fastpgcache import Cache, setup_cache
from fastpgcache.embedded import default_url

db = SQLAlchemy()
views = FlaskCache()
notes_cache = Cache(db.session)  # runs on the request's session: commits and rolls back with it
routes = Blueprint("routes", __name__)
report_runs = {"count": 0}


class Note(db.Model):
    __tablename__ = "example_notes"

    name: Mapped[str] = mapped_column(primary_key=True)
    text: Mapped[str]


def create_app(url: str | None = None) -> Flask:
    """The app, on FASTPGCACHE_URL or an embedded server; the cache table is created if missing."""
    url = url or default_url()
    setup_cache(url=url)
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=url, CACHE_TYPE="fastpgcache.contrib.flask.FastPgCache",
                      CACHE_DEFAULT_TIMEOUT=300, CACHE_KEY_PREFIX="example_",
                      SECRET_KEY=os.environ.get("FLASK_SECRET_KEY", "example-only-not-secret"))  # signs cached pickles
    db.init_app(app)
    views.init_app(app)
    app.register_blueprint(routes)
    with app.app_context():
        db.create_all()
    return app


@routes.get("/report")
@views.cached(timeout=60)
def report():
    report_runs["count"] += 1
    time.sleep(0.2)  # stands in for a slow query
    return {"total": sum(range(1_000_000)), "computed_times": report_runs["count"]}


@routes.post("/notes/<name>")
def save_note(name):
    text = request.get_data(as_text=True)
    db.session.merge(Note(name=name, text=text))
    notes_cache.set(f"note:{name}", text, ttl=600)
    if "spam" in text:
        abort(400, "spam refused")  # the session is rolled back: no row and no cache entry
    db.session.commit()
    return {"saved": name}


@routes.get("/notes/<name>")
def read_note(name):
    return {"name": name, "cached": notes_cache.get(f"note:{name}")}


def main() -> None:
    app = create_app()
    client = app.test_client()
    for _ in range(3):
        started = time.perf_counter()
        body = client.get("/report").get_json()
        print(f"GET /report -> computed_times={body['computed_times']} in {time.perf_counter() - started:.3f} s")
    print("POST /notes/hello ->", client.post("/notes/hello", data="hi there").status_code)
    print("POST /notes/junk ->", client.post("/notes/junk", data="buy spam").status_code)
    print("GET /notes/hello ->", client.get("/notes/hello").get_json())
    print("GET /notes/junk ->", client.get("/notes/junk").get_json())
    with app.app_context():
        views.clear()
        notes_cache.delete_many(["note:hello", "note:junk"])
        db.session.commit()
        db.drop_all()


if __name__ == "__main__":
    main()
