"""The analyst's two ways to get N Order events into a pandas DataFrame, timed: Arrow Flight
from the flight-streamer (typed columns, `read_pandas`), and what one would write without it
(pull the JSON from JetStream with nats-py, `json.loads` each, `pd.DataFrame`, parse the times).
Run by benches/flight.rs; prints one JSON line of seconds."""

import asyncio
import json
import sys
import time

import nats
import pandas as pd
import pyarrow.flight as flight
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def via_flight(url, token, n):
    started = time.perf_counter()
    client = flight.connect(url)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    df = client.do_get(flight.Ticket(b"observer_events:Order"), options).read_pandas()
    assert len(df) == n, len(df)
    return time.perf_counter() - started


async def via_json(nats_url, n):
    started = time.perf_counter()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        "herald.events.Order.>", durable=None, stream="HERALD_EVENTS",
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL))
    rows = []
    while len(rows) < n:
        for msg in await sub.fetch(min(1000, n - len(rows)), timeout=10):
            event = json.loads(msg.data)
            row = {f"before_{k}": v for k, v in (event["before"] or {}).items()}
            row.update(event["data"] or {})
            row.update(id=event["id"], op=event["op"], key=event["key"], at=event["at"],
                       actor=event["actor"], tx=event["tx"], seq=msg.metadata.sequence.stream)
            rows.append(row)
    await nc.close()
    df = pd.DataFrame(rows)
    df["at"] = pd.to_datetime(df["at"], utc=True, format="ISO8601")
    df["created_at"] = pd.to_datetime(df["created_at"], utc=True, format="ISO8601")
    assert len(df) == n
    return time.perf_counter() - started


def main():
    flight_url, token, nats_url, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    flight_s = via_flight(flight_url, token, n)
    json_s = asyncio.run(via_json(nats_url, n))
    print(json.dumps({"flight_s": flight_s, "json_s": json_s}))


if __name__ == "__main__":
    main()
