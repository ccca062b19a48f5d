"""The shared store tier (RemoteBackend) on Redis, Valkey or Redis Cluster.

client.py   redis-py clients from a parsed `remote_url`, and the store's health
keys.py     key names: the layout fingerprint and the chunk hash
values.py   a chunk's value: a checked chunk record, in pieces of one Redis hash
ops.py      the store commands, one round trip each
writer.py   the bounded background writer of saved chunks
tier.py     RemoteBackend itself
"""

from lmc_connector.cache.tiers.remote.tier import RemoteBackend

__all__ = ["RemoteBackend"]
