"""Everything that crosses a process boundary: msgspec messages, one per channel, the
socket helpers and the one request/reply transport. Never imports torch, vllm or the cache.

Channels:

* `monitor`: worker agents PUSH -> controller PULL (`--monitor-port`);
* `commands`: controller -> worker agent (`lmcache_worker_ports[rank]`), request/reply;
* `lookup`: vLLM's scheduler -> its own workers (node-local IPC), request/reply.
"""

from lmc_connector.control.wire.codec import Decoder, MessageError, encode

__all__ = ["Decoder", "MessageError", "encode"]
