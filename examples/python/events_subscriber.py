"""Every Order event, once, in order, across restarts: a durable consumer on
`herald.events.Order.>` that appends each event to a JSON-lines file.

    NATS_URL=nats://127.0.0.1:14222 .venv/bin/python examples/python/events_subscriber.py orders.jsonl

The durable consumer (`DURABLE`, default `order-events`) remembers on the server what was
acknowledged, so a restarted subscriber — even one killed with SIGKILL — goes on where it
stopped: nothing is missed. An event is acknowledged only after its line is on disk (flushed
and fsynced), so a crash between the two redelivers it; the subscriber knows the event ids
already in the file and skips those, so nothing is written twice either.

Connects as the `custom-worker` user of nats/auth.conf (NATS_USER / NATS_PASSWORD override it).
"""

import asyncio
import json
import os
import signal
import sys

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

SUBJECT = "herald.events.Order.>"
SCHEMA_VERSION = 1


def ids_in(path):
    """The event ids already written, so a redelivery after a crash is not written again."""
    seen = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    seen.add(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash mid-write; its event comes again
    return seen


async def main(path):
    nc = await nats.connect(
        os.environ.get("NATS_URL", "nats://127.0.0.1:14222"),
        user=os.environ.get("NATS_USER", "custom-worker"),
        password=os.environ.get("NATS_PASSWORD", "custom-worker-dev-password"),
    )
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        SUBJECT,
        durable=os.environ.get("DURABLE", "order-events"),
        stream="HERALD_EVENTS",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_deliver=-1),
    )
    seen = ids_in(path)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"events_subscriber: {SUBJECT} -> {path} ({len(seen)} events already there)", flush=True)
    with open(path, "a", encoding="utf-8") as out:
        while not stop.is_set():
            try:
                # One at a time: per-entity order is the stream's order, kept by never having
                # two in hand.
                msgs = await sub.fetch(1, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                try:
                    event = json.loads(msg.data)
                    if event.get("schema_version") != SCHEMA_VERSION:
                        raise ValueError(f'unsupported schema_version {event.get("schema_version")}')
                except (ValueError, AttributeError) as e:
                    # Not ours to dead-letter (this user may not publish to herald.dlq.events):
                    # say so, and leave it for the operator.
                    print(f"events_subscriber: skipping {msg.subject} #{msg.metadata.sequence.stream}: {e}", flush=True)
                    await msg.term()
                    continue
                if event["id"] not in seen:
                    out.write(json.dumps(event, separators=(",", ":")) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                    seen.add(event["id"])
                await msg.ack_sync()
    await nc.drain()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: events_subscriber.py <output.jsonl>")
    asyncio.run(main(sys.argv[1]))
