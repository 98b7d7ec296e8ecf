"""The OpenAI gateway under uvicorn on a free loopback port, in a daemon thread, for tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from gateway_svc.app import create_app
from gateway_svc.config import GatewayConfig

MODEL = "test-model"  # ServerThread's model_id, the name the gateway serves


class GatewayThread:
    """`GatewayThread(target).start()` ... `.stop()`, or `with GatewayThread(target) as gateway:`."""

    def __init__(self, target: str, **config):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        app = create_app(GatewayConfig(target=target, **config))
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout_s: float = 30) -> "GatewayThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self.socket.close()

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
