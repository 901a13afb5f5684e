"""Cache writes inside the application's own transaction: they commit or roll back with it.

    python examples/sqlalchemy_session.py

Uses FASTPGCACHE_URL, or a throwaway embedded PostgreSQL when it is not set.
"""
from sqlalchemy import String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from fastpgcache import Cache, setup_cache
from fastpgcache.embedded import default_url


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(String(100))


class PaymentDeclined(Exception):
    pass


def place_order(session: Session, item: str, *, paid: bool) -> int:
    """Insert an order and cache its summary in the same transaction."""
    order = Order(item=item)
    session.add(order)
    session.flush()  # the id exists now, inside the still-open transaction
    Cache(session).set(f"order:{order.id}", {"item": item, "status": "placed"}, ttl=600)
    if not paid:
        raise PaymentDeclined(item)
    return order.id


def main() -> None:
    url = default_url()
    setup_cache(url=url)
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    outside = Cache(engine)  # another connection: sees only committed rows
    try:
        with Session(engine) as session:
            with session.begin():
                kept = place_order(session, "book", paid=True)
            try:
                with session.begin():
                    place_order(session, "lamp", paid=False)
            except PaymentDeclined:
                pass
            lost = kept + 1  # the id the rolled-back order had
            orders = session.scalar(select(func.count()).select_from(Order))
        print("committed order: cache has", outside.get(f"order:{kept}"))
        print("rolled-back order: cache has", outside.get(f"order:{lost}"))
        print("orders in the table:", orders)
    finally:
        outside.delete_many([f"order:{kept}", f"order:{kept + 1}"])
        Base.metadata.drop_all(engine)
        engine.dispose()


if __name__ == "__main__":
    main()
