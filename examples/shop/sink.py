#!/usr/bin/env python3
"""The local sink for the shop's observers: answers every HTTP request 204 and prints it, and
accepts every e-mail on a bare SMTP port and prints its recipients and subject.

    python3 examples/shop/sink.py [http port] [smtp port]     # default 9900 and 2525

Standard Webhooks signatures are checked with the development secret of
examples/dev/action-worker.toml (override with SINK_SECRET=whsec_...), and repeats of a
webhook-id are reported as such: that is how a receiver absorbs a redelivery.
"""
import base64
import hashlib
import hmac
import os
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("SINK_SECRET", "whsec_aGVyYWxkLWRldi13ZWJob29rLXNlY3JldA==")
KEY = base64.b64decode(SECRET.removeprefix("whsec_"))
SEEN = set()


def signature_ok(msg_id, timestamp, body, header):
    mac = hmac.new(KEY, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    expected = "v1," + base64.b64encode(mac.digest()).decode()
    return any(hmac.compare_digest(expected, s) for s in header.split())


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg_id = self.headers.get("webhook-id")
        note = ""
        if msg_id:
            signature = self.headers.get("webhook-signature")
            if signature is None:
                note = " unsigned"
            elif signature_ok(msg_id, self.headers.get("webhook-timestamp", ""), body, signature):
                note = " signature ok"
            else:
                note = " BAD SIGNATURE"
            if msg_id in SEEN:
                note += " (repeat, absorbed)"
            SEEN.add(msg_id)
        key = self.headers.get("idempotency-key")
        print(f"{self.path} id={msg_id or key}{note} {body[:200].decode(errors='replace')}", flush=True)
        self.send_response(204)
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, *args):
        pass


class Smtp(socketserver.StreamRequestHandler):
    """Just enough SMTP for a relay without TLS or authentication: every command is accepted."""

    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self):
        self.reply("220 herald-sink")
        recipients, subject = [], ""
        while line := self.rfile.readline():
            command = line.decode(errors="replace").strip()
            verb = command[:4].upper()
            if verb == "EHLO" or verb == "HELO":
                self.reply("250 herald-sink")
            elif verb == "RCPT":
                recipients.append(command.split(":", 1)[-1].strip())
                self.reply("250 ok")
            elif verb == "DATA":
                self.reply("354 end with <CRLF>.<CRLF>")
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    if data.lower().startswith(b"subject:"):
                        subject = data[8:].decode(errors="replace").strip()
                print(f"smtp to={','.join(recipients)} subject={subject!r}", flush=True)
                recipients = []
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9900
    smtp_port = int(sys.argv[2]) if len(sys.argv) > 2 else 2525
    smtp = socketserver.ThreadingTCPServer(("127.0.0.1", smtp_port), Smtp)
    threading.Thread(target=smtp.serve_forever, daemon=True).start()
    print(f"sink listening on http://127.0.0.1:{port} and smtp://127.0.0.1:{smtp_port}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
