#!/usr/bin/env python3
"""A socket-activated echo worker in Python: proof that an unmodified server that takes
its socket from systemd-style activation (fd 3, LISTEN_FDS, LISTEN_PID) runs under
portshard. Same protocol as `portshard echo`: UDP answers "<slot> <pid> <datagram>",
TCP greets each connection with "<slot> <pid>\\n" and echoes what follows."""
import os
import socket
import sys
import threading

if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
    sys.exit("not socket-activated: LISTEN_FDS/LISTEN_PID do not hand this process fd 3")

identity = f"{os.environ['PORTSHARD_SLOT']} {os.getpid()}"
sock = socket.socket(fileno=3)

if sock.type == socket.SOCK_DGRAM:
    prefix = (identity + " ").encode()
    while True:
        data, peer = sock.recvfrom(65536)
        try:
            sock.sendto(prefix + data, peer)
        except OSError:
            pass


def serve(conn):
    with conn:
        try:
            conn.sendall((identity + "\n").encode())
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


while True:
    conn, _ = sock.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
