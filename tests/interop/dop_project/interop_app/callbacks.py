"""Subscriber callbacks for `manage.py subscribe`.

    manage.py subscribe interop_app.callbacks.record <destination> [queue_name]
    manage.py subscribe interop_app.callbacks.fail   <destination> [queue_name]

`record` follows the library's documented pattern: inside transaction.atomic() it calls
payload.save() (which INSERTs the `received` dedup row); the library ACKs after the callback
returns. After the transaction commits, one JSON line is appended to $DOP_RECORD_FILE:

    {"msg_id": ..., "body": ..., "headers": {...}, "callback": "record", "pid": ..., "recorded_at": ...}

`msg_id` is the value the library uses for dedup (cap-msg-id || dop-msg-id || message-id),
i.e. exactly what ends up in received.msg_id.

`fail` always raises, so the library NACKs with requeue:False and RabbitMQ dead-letters the
message into DLQ.<queue>. If $DOP_FAIL_RECORD_FILE is set, a line with "callback": "fail" is
appended there first (so a test can tell the message was delivered before being rejected).
"""
import json
import logging
import os

from django.db import transaction
from django.utils import timezone

_logger = logging.getLogger("interop_app")


def _append_line(path, entry):
    line = json.dumps(entry, sort_keys=True, default=str) + "\n"
    # One write() per line on an O_APPEND file: safe with several subscriber processes.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()


def _entry(payload, callback):
    msg_id = payload.message.msg_id if payload.message is not None else None
    return {
        "callback": callback,
        "msg_id": msg_id,
        "body": payload.body,
        "headers": dict(payload.headers),
        "pid": os.getpid(),
        "recorded_at": timezone.now().isoformat(),
    }


def record(payload):
    path = os.environ.get("DOP_RECORD_FILE")
    if not path:
        # Raise BEFORE saving: the library then NACKs (-> DLQ) and nothing is half-recorded.
        raise RuntimeError("DOP_RECORD_FILE is not set; interop_app.callbacks.record needs it")
    entry = _entry(payload, "record")
    with transaction.atomic():
        payload.save()
    # Only committed receipts are recorded.
    _append_line(path, entry)
    _logger.info("recorded msg_id=%s", entry["msg_id"])


def fail(payload):
    path = os.environ.get("DOP_FAIL_RECORD_FILE")
    entry = _entry(payload, "fail")
    if path:
        _append_line(path, entry)
    raise RuntimeError(f"interop fail callback rejects msg_id={entry['msg_id']}")
