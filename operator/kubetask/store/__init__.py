"""PostgreSQL state: tables, the one session factory, migrations and queries."""
