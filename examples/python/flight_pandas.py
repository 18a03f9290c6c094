"""Herald events in pandas, a table export in polars, over Arrow Flight.

Against the local stack (scripts/dev up):

    .venv/bin/python examples/python/flight_pandas.py

The columns arrive typed (int64, float64, datetime64[us, UTC], ...), as the gateway's schema
file and the database declare them; nothing is parsed from JSON on this side. `--json` prints
one summary line instead of tables (the CI test reads it).
"""

import argparse
import json
import os

import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("HERALD_FLIGHT_URL", "grpc://127.0.0.1:50051"))
    parser.add_argument("--token", default=os.environ.get("HERALD_FLIGHT_TOKEN", "flight-dev-token-0123456789"))
    parser.add_argument("--since", default="2026-01-01T00:00:00Z", help="RFC 3339 start of the replay")
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")
    args = parser.parse_args()

    client = flight.connect(args.url)
    # Handshake trades the token for the bearer header every other call needs.
    header = client.authenticate_basic_token(b"analyst", args.token.encode())
    options = flight.FlightCallOptions(headers=[header])

    flights = list(client.list_flights(options=options))

    # The seed ticket: every Order event since a time, up to the last one stored now.
    reader = client.do_get(flight.Ticket(f"observer_events:Order:{args.since}".encode()), options)
    batches, cursor = [], None
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        batches.append(chunk.data)
        if chunk.app_metadata is not None and chunk.app_metadata.size:
            # The last stream sequence read: {"events": "Order", "after_seq": cursor} resumes here.
            cursor = int(chunk.app_metadata.to_pybytes())
    events = pa.Table.from_batches(batches, schema=reader.schema).to_pandas()

    # A bulk export straight from PostgreSQL, filtered with bound values.
    ticket = b"export:orders:created_at>2026-01-01:id,total,customer_id,created_at"
    orders = pl.from_arrow(client.do_get(flight.Ticket(ticket), options).read_all())

    if args.json:
        print(json.dumps({
            "flights": sorted("/".join(f.descriptor.path[i].decode() for i in range(2)) for f in flights),
            "events": len(events),
            "cursor": cursor,
            "event_dtypes": {column: str(dtype) for column, dtype in events.dtypes.items()},
            "export_rows": orders.height,
            "export_dtypes": {column: str(dtype) for column, dtype in orders.schema.items()},
        }))
        return
    for info in flights:
        print(f"{'/'.join(p.decode() for p in info.descriptor.path):24} {info.total_records:>10} rows")
    print(f"\n{len(events)} Order events since {args.since} (resume after seq {cursor})")
    print(events.dtypes.to_string())
    with pd.option_context("display.width", 160, "display.max_columns", 12):
        print(events.tail())
    print(f"\n{orders.height} orders exported")
    print(orders.head())


if __name__ == "__main__":
    main()
