"""The controller's locate server: vLLM schedulers ask which peer instance holds a prompt.

One request/reply server on `--reply-port` (the schedulers' `controller_reply_url`); the
handler runs on its thread and answers from the chunk index under the state's lock, in
microseconds, so one thread serves every scheduler.
"""

from __future__ import annotations

import logging

import zmq

from lmc_connector.control.controller.peers import find_peer
from lmc_connector.control.controller.state import ControllerState
from lmc_connector.control.wire import locate as lw
from lmc_connector.control.wire.codec import MessageError, encode
from lmc_connector.control.wire.rpc import Call, RpcServer
from lmc_connector.control.wire.security import ChannelSecurity
from lmc_connector.throttle import Throttle
from lmc_connector.tokens import ChunkKey

logger = logging.getLogger(__name__)

WARN_EVERY_S = 10.0


class LocateServer:
    """Answers `FindPeer` from the controller's state. Owns its request/reply server.

    Construct, `start` (binds; a taken port raises zmq.ZMQError in the caller), `close`.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        state: ControllerState,
        bind_url: str,
        security: ChannelSecurity,
    ) -> None:
        self._state = state
        self._server = RpcServer(context, bind_url, self._handle, "locate", security)
        self._decoder = lw.find_peer_decoder()
        self._warn = Throttle(WARN_EVERY_S)
        self.answered = 0

    @property
    def alive(self) -> bool:
        return self._server.alive

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        self._server.close()

    def _handle(self, call: Call) -> None:
        try:
            ask = self._decoder.decode(call.frames[0].buffer)
        except MessageError as e:
            if self._warn.ready():
                logger.warning("locate: %s", e)
            call.reply([encode(lw.PeerFound(error=str(e)[:200]))])
            return
        keys = [ChunkKey(k) for k in ask.keys]
        found = find_peer(self._state, ask.instance_id, keys, ask.min_chunks, ask.avoid)
        self.answered += 1
        call.reply([encode(found)])
