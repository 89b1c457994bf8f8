"""Peers for the tests, none of them built on gforward's own code; a module each.

* `frames`: RFC 6455 frames as the fake daemons write and read them, written
  here from the RFC, independently of gforward.proto.frames.
* `server`: `ThreadedServer`, the listening socket in threads under the fake
  daemon and the guests; `PEER_TIMEOUT`; `reset_on_close`.
* `fake_daemon`: `FakeDaemon`, a raw-socket daemon whose connections each run
  a script of one `Peer`, and the scripts several test modules share.
* `guest`: `Guest`, a service inside the "VM", and `echo_until_eof`.
* `programs`: `Program` and `Programs`, programs run as a user runs them,
  `clean_env`, and `announced` / `daemon_process`, our own programs once they
  say where they listen.
* `gws`: the gevent-websocket peer, run as `python -m tests.peers.gws`.
"""
