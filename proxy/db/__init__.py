"""Everything that talks SQL: the pool, the schema, and one named function per statement."""
