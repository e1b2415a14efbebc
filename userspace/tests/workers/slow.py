#!/usr/bin/env python3
"""A socket-activated TCP server that serves one connection at a time and spends
SLOW_PAUSE seconds (default 0.02) on each before it greets it with "<slot> <pid>\\n" and
closes it: a server waiting on its backend. Offered more connections than that allows,
its accept queue fills and stays full, while it keeps working through it."""
import os
import socket
import sys
import time

if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
    sys.exit("not socket-activated: LISTEN_FDS/LISTEN_PID do not hand this process fd 3")

identity = (f"{os.environ['PORTSHARD_SLOT']} {os.getpid()}\n").encode()
pause = float(os.environ.get("SLOW_PAUSE", "0.02"))
sock = socket.socket(fileno=3)

while True:
    conn, _ = sock.accept()
    with conn:
        time.sleep(pause)
        try:
            conn.sendall(identity)
        except OSError:
            pass
