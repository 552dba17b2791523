"""The de-identification engine: pure functions over one file plus the identity store.

Modules here take bytes or a dataset, a :class:`~anonpipe.anon.profile.Profile` and the identity
store the caller hands in, and return a result; there is no network access and no asyncio, so the
engine can be tested file by file and run in a worker thread or process.
"""
