"""uvicorn's httptools protocol, handing each piece of a request body to the app as it was parsed.

uvicorn appends every piece httptools parses to a ``bytearray`` and gives the app ``bytes(bytearray)``:
two copies of every body byte on the event loop before ``read_body`` copies it once more into its
tensor buffer (3 of 4 copies of a 40 MB step's gradients, measured in ``bench/``). Here a piece that
arrives while nothing is waiting is kept as the ``bytes`` object httptools made, and uvicorn's
``bytes(body)`` of a ``bytes`` object is that object itself: the app gets it without a copy. Pieces
that arrive before the app took the last one are joined as uvicorn joins them.

Only ``on_body`` differs from uvicorn's (pinned in ``constraints.txt``); flow control is the same:
reading pauses while more than ``HIGH_WATER_LIMIT`` bytes wait for the app.
"""

from __future__ import annotations

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BodyProtocol(HttpToolsProtocol):
    def on_body(self, body: bytes) -> None:
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        cycle = self.cycle
        if not cycle.body:
            cycle.body = body  # type: ignore[assignment]  # a bytes object: receive() passes it on as it is
        else:
            if not isinstance(cycle.body, bytearray):
                cycle.body = bytearray(cycle.body)
            cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()
