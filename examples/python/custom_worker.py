"""A custom Herald action kind in Python: `invoice`, end to end.

The dispatcher publishes an ActionRequest to `herald.actions.invoice.<observer>` for every
observer in the observers file that declares an action of kind `invoice` (see observers.toml
beside this file). This worker consumes them from a durable pull consumer and, per the contract
in contracts/README.md:

- POSTs the invoice to the action's `url`, keyed on the action id (`Idempotency-Key`), so a
  repeat does nothing twice at a receiver that de-duplicates;
- publishes one ActionOutcome per attempt to `herald.outcomes.invoice.<observer>`
  (Nats-Msg-Id `<action id>:<attempt>`, the message's `traceparent` copied), waits for the
  PubAck, and only then settles the message;
- on a transient failure (connection error, 429, 5xx) NAKs with the delay the action's retry
  policy gives for this attempt (the action stays unacknowledged meanwhile and counts against
  this consumer's max_ack_pending, which bounds how many may wait at once; the built-in worker
  schedules a copy instead, see "Scheduled retries" in contracts/README.md);
- on a permanent failure (another 4xx, a message it cannot read) or the last attempt, publishes
  the message to `herald.dlq.actions` with the Herald-* headers, waits for the PubAck, then TERMs.

    NATS_URL=nats://127.0.0.1:14222 .venv/bin/python examples/python/custom_worker.py

Connects as the `custom-worker` user of nats/auth.conf (NATS_USER / NATS_PASSWORD override it).
Stops cleanly on SIGINT or SIGTERM: messages in hand are finished, the rest stay in the stream.
"""

import asyncio
import datetime
import json
import os
import random
import signal
import time
import urllib.error
import urllib.request

import nats
from nats.js.api import AckPolicy, ConsumerConfig

KIND = "invoice"
SCHEMA_VERSION = 1
# The ActionRequest fields this worker uses (contracts/schemas/action-request.schema.json).
REQUIRED = ("id", "kind", "observer", "config", "retry", "timeout_ms", "event")
WORKER = "custom-worker.py"
# Herald's dead-letter headers (contracts/README.md, "Headers").
ORIGINAL_SUBJECT = "Herald-Original-Subject"
ORIGINAL_MSG_ID = "Herald-Original-Msg-Id"
ERROR = "Herald-Error"
ATTEMPTS = "Herald-Attempts"
FIRST_FAILED_AT = "Herald-First-Failed-At"
DEAD_LETTERED_AT = "Herald-Dead-Lettered-At"
DEAD_LETTERED_BY = "Herald-Dead-Lettered-By"
HTTP_STATUS = "Herald-Http-Status"
RESPONSE_SNIPPET = "Herald-Response-Snippet"


class Transient(Exception):
    """Worth trying again later."""

    def __init__(self, message, http_status=None):
        super().__init__(message)
        self.http_status = http_status


class Permanent(Exception):
    """Will fail the same way every time: dead-letter it."""

    def __init__(self, message, http_status=None, snippet=None):
        super().__init__(message)
        self.http_status = http_status
        self.snippet = snippet


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def one_line(text, limit=1024):
    """A header value: one line, at most `limit` bytes (longer ones end in an ellipsis)."""
    text = " ".join(str(text).split())
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


def retry_delay(policy, attempt):
    """Seconds to wait after failed attempt `attempt` (1-based), as contracts/README.md says."""
    delay = min(policy["initial_delay_ms"] * policy["multiplier"] ** (attempt - 1), policy["max_delay_ms"])
    if policy.get("jitter"):
        delay = min(delay + delay * random.random(), policy["max_delay_ms"])
    return delay / 1000


def send_invoice(action):
    """The kind's effect: one POST per action, keyed on the action id."""
    config, event = action["config"], action["event"]
    invoice = {
        "invoice_for": f'{event["entity"]} {event["key"]}',
        "amount": (event.get("data") or {}).get("total"),
        "currency": config.get("currency", "EUR"),
        "action_id": action["id"],
    }
    request = urllib.request.Request(
        config["url"],
        data=json.dumps(invoice).encode(),
        method="POST",
        headers={"content-type": "application/json", "idempotency-key": action["id"]},
    )
    timeout = max(action["timeout_ms"] / 1000, 0.1)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        body = e.read(256).decode(errors="replace")
        if e.code == 429 or e.code >= 500:
            raise Transient(f"the invoicing service answered {e.code}", e.code) from None
        raise Permanent(f"the invoicing service refused the invoice with {e.code}: {body}", e.code, body) from None
    except (urllib.error.URLError, OSError) as e:
        raise Transient(f"cannot reach the invoicing service: {e}") from None


class Worker:
    def __init__(self, js):
        self.js = js

    async def publish(self, subject, payload, headers):
        # The PubAck is the proof it is stored: only then is the original settled.
        await self.js.publish(subject, payload, headers=headers)

    async def outcome(self, msg, action, attempt, status, started, error=None, http_status=None):
        outcome = {
            "action_id": action["id"],
            "event_id": action["event"]["id"],
            "kind": action["kind"],
            "observer": action["observer"],
            "attempt": attempt,
            "status": status,
            "latency_ms": int((time.monotonic() - started) * 1000),
            "error": error,
            "http_status": http_status,
            "schema_version": SCHEMA_VERSION,
            "at": now(),
        }
        own = (msg.headers or {}).get("Nats-Msg-Id") or action["id"]
        headers = {"Nats-Msg-Id": f"{own}:{attempt}"}
        for name in ("traceparent", "tracestate"):
            if name in (msg.headers or {}):
                headers[name] = msg.headers[name]
        await self.publish(f'herald.outcomes.{action["kind"]}.{action["observer"]}', json.dumps(outcome).encode(), headers)

    @staticmethod
    def msg_id(msg):
        """The message's Nats-Msg-Id (the action id, or a replay's own id)."""
        own = (msg.headers or {}).get("Nats-Msg-Id")
        return own or f"{msg.metadata.stream}:{msg.metadata.sequence.stream}"

    async def dead_letter(self, msg, attempt, reason, http_status=None, snippet=None):
        stamp = now()
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(
            {
                "Nats-Msg-Id": f"{self.msg_id(msg)}:dlq",
                ORIGINAL_SUBJECT: msg.subject,
                ORIGINAL_MSG_ID: self.msg_id(msg),
                ERROR: one_line(reason),
                ATTEMPTS: str(attempt),
                # This worker keeps no state between attempts: the first failure it can vouch
                # for is when the action was stored, or now for a first attempt.
                FIRST_FAILED_AT: stamp if attempt == 1 else msg.metadata.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                DEAD_LETTERED_AT: stamp,
                DEAD_LETTERED_BY: WORKER,
            }
        )
        if http_status is not None:
            headers[HTTP_STATUS] = str(http_status)
        if snippet:
            headers[RESPONSE_SNIPPET] = one_line(snippet, 256)
        await self.publish("herald.dlq.actions", msg.data, headers)
        await msg.term()

    async def handle(self, msg):
        attempt, started = msg.metadata.num_delivered, time.monotonic()
        try:
            action = json.loads(msg.data)
            if not isinstance(action, dict) or action.get("schema_version") != SCHEMA_VERSION:
                version = action.get("schema_version") if isinstance(action, dict) else None
                raise ValueError(f"unsupported schema_version {version} (this worker understands {SCHEMA_VERSION})")
            missing = [field for field in REQUIRED if field not in action]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
        except (ValueError, KeyError, TypeError) as e:
            await self.dead_letter(msg, attempt, f"not an ActionRequest this worker can read: {e}")
            return
        try:
            status = await asyncio.to_thread(send_invoice, action)
        except Transient as e:
            if attempt < action["retry"]["max_attempts"]:
                await self.outcome(msg, action, attempt, "retrying", started, str(e), e.http_status)
                await msg.nak(delay=retry_delay(action["retry"], attempt))
            else:
                reason = f"gave up after {attempt} attempts: {e}"
                await self.outcome(msg, action, attempt, "dead_lettered", started, reason, e.http_status)
                await self.dead_letter(msg, attempt, reason, e.http_status)
            return
        except Permanent as e:
            await self.outcome(msg, action, attempt, "dead_lettered", started, str(e), e.http_status)
            await self.dead_letter(msg, attempt, str(e), e.http_status, e.snippet)
            return
        await self.outcome(msg, action, attempt, "succeeded", started, None, status)
        await msg.ack_sync()


async def main():
    nc = await nats.connect(
        os.environ.get("NATS_URL", "nats://127.0.0.1:14222"),
        user=os.environ.get("NATS_USER", "custom-worker"),
        password=os.environ.get("NATS_PASSWORD", "custom-worker-dev-password"),
    )
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        f"herald.actions.{KIND}.>",
        durable=os.environ.get("DURABLE", f"{KIND}-worker"),
        stream="HERALD_ACTIONS",
        # max_deliver -1: giving up is this worker's decision (a dead letter), never JetStream's
        # silent drop. The ack wait is above the slowest attempt.
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_deliver=-1),
    )
    worker = Worker(js)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"{WORKER}: consuming herald.actions.{KIND}.>", flush=True)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(16, timeout=1)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            try:
                await worker.handle(msg)
            except Exception as e:  # noqa: BLE001 - NATS down: leave it unacked, it comes back
                print(f"{WORKER}: {msg.subject}: {e}; it will be redelivered", flush=True)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
