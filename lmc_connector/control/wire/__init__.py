"""Everything that crosses a process boundary: msgspec messages, one per channel, the
socket helpers and the one request/reply transport. Never imports torch, vllm or the cache.

Channels:

* `monitor`: worker agents PUSH -> controller PULL (`--monitor-port`);
* `commands`: controller -> worker agent (`lmcache_worker_ports[rank]`), request/reply;
* `lookup`: vLLM's scheduler -> its own workers (node-local IPC), request/reply;
* `locate`: vLLM's scheduler -> controller (`--reply-port`): which instance holds a prompt;
* `peer`: worker -> the same rank of another instance (`p2p_init_ports[rank]`): chunks.
"""

from lmc_connector.control.wire.codec import Decoder, MessageError, encode

__all__ = ["Decoder", "MessageError", "encode"]
