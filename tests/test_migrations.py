"""The Alembic migration creates exactly the tables the models describe."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.models import Base


def assert_schema_matches(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            differences = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert differences == []
    assert set(Base.metadata.tables) <= tables


def test_migration_on_sqlite(sqlite_service):
    assert_schema_matches(sqlite_service.database_url)


def test_migration_on_postgres(postgres_service):
    assert_schema_matches(postgres_service.database_url)
