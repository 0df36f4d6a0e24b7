"""The HDF5 feature cache (docs/cache-format.md): schema, journal, lock, reader, writer, parts, shards, verify."""
