"""The protocol floor: pure functions and state machines that never touch a socket.

Spec text to mappings (`mapping`), a base URL to where the daemon is
(`endpoint`), the upgrade request and the check of its answer (`handshake`),
frames and masking (`frames`), random keys drawn in blocks (`draws`), the
HTTP CONNECT exchange and proxy selection (`proxy`), the reference daemon's
upstream policy (`allow`), and a tunnel's rules as a state machine with the
clock passed in (`tunnel`).  Nothing here imports gevent or a socket, so all
of it is tested with bytes alone.
"""
