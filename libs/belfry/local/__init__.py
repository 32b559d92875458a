"""The embedded local run behind ``belfry up``: private PostgreSQL, mail catcher, supervisor."""
