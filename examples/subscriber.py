#!/usr/bin/env python3
"""A complete subscriber of segment changes in Python (confluent-kafka and fastavro).

It reads the output topic from the beginning, decodes the Confluent-framed Avro records with the
bundled schema, applies the version rule (drop a record whose `version` is not greater than the
last one applied for that user), and keeps each user's current segment, action and value.

    pip install confluent-kafka==2.12.1 fastavro==1.12.1
    python examples/subscriber.py --brokers 127.0.0.1:9092 --topic segment-changes \
        [--group my-crm] [-X security.protocol=SASL_SSL -X ...] [--idle-exit-ms 10000]

With --idle-exit-ms it stops after that long without a record (once one came) and prints its view, one JSON
object per user; without it, it runs until interrupted and prints each applied change.
"""

import argparse
import io
import json
import os
import time

import fastavro
from confluent_kafka import Consumer

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "..", "schemas", "segment_change.avsc")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", default="segment-changes")
    p.add_argument("--group", default=f"subscriber-{os.getpid()}")
    p.add_argument("-X", action="append", default=[], help="librdkafka property key=value")
    p.add_argument("--idle-exit-ms", type=int)
    args = p.parse_args()

    with open(SCHEMA_PATH) as f:
        schema = fastavro.parse_schema(json.load(f))
    conf = {
        "bootstrap.servers": args.brokers,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        # Find the topic soon if it is created after we start (librdkafka's default: 5 min).
        "topic.metadata.refresh.interval.ms": 10000,
    }
    for kv in args.X:
        key, _, value = kv.partition("=")
        conf[key] = value
    consumer = Consumer(conf)
    consumer.subscribe([args.topic])

    view, last_version = {}, {}
    # Idle is counted from the last record, once one came (joining the group takes a while).
    last_record = None
    try:
        while True:
            msg = consumer.poll(0.2)
            if msg is None:
                idle = last_record is not None and (time.monotonic() - last_record) * 1000
                if args.idle_exit_ms and idle and idle >= args.idle_exit_ms:
                    break
                continue
            if msg.error():
                continue
            last_record = time.monotonic()
            payload = msg.value()
            # Confluent framing: magic byte 0, then the 4-byte big-endian schema id, then Avro.
            if payload is None or len(payload) < 5 or payload[0] != 0:
                continue
            change = fastavro.schemaless_reader(io.BytesIO(payload[5:]), schema)
            user, version = change["user_id"], change["version"]
            # The version rule: repeats after a crash or a hand-over carry a version already seen.
            if user in last_version and version <= last_version[user]:
                continue
            last_version[user] = version
            if change["reason"] in ("erased", "evicted"):
                # The service no longer holds the user (erasure: forget what you hold too).
                view.pop(user, None)
                continue
            current = {
                "segment": change["new_segment"],
                "version": version,
                "action": change.get("action"),
                "predicted_value": change["predicted_value"],
            }
            if not args.idle_exit_ms:
                print(user, change["reason"], "->", json.dumps(current), flush=True)
            view[user] = current
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    for user in sorted(view):
        print(json.dumps({**view[user], "user_id": user}))


if __name__ == "__main__":
    main()
