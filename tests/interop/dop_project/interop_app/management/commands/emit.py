"""Create outbox rows the documented way, for `manage.py publish` to relay.

    manage.py emit --destination /topic/interop.py --count N [--version v1] [--start 1]
                   [--header KEY=VALUE ...] [--one-transaction | --per-row-transaction]

Each row: Published.objects.create(destination=..., body={"id": i, "source": "python",
"price": "1.50"}, version=..., headers=...) inside transaction.atomic(). With --version the
library appends ".<version>" to the destination on insert. Prints one line per row after the
commit: "<published.id>\t<destination>" (published.id is the dop-msg-id header value).
"""
from django.core.management.base import BaseCommand
from django.core.management.base import CommandError
from django.db import transaction

from django_outbox_pattern.models import Published


class Command(BaseCommand):
    help = "Create N Published (outbox) rows for `manage.py publish` to send"

    def add_base_argument(self, parser, *args, **kwargs):
        # Django adds its own --version (prints the Django version); this command needs
        # --version for the message version, as in the library's Config(version=...).
        if "--version" in args:
            return
        super().add_base_argument(parser, *args, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("--destination", required=True, help="STOMP destination, e.g. /topic/interop.py")
        parser.add_argument("--count", type=int, required=True, help="number of rows to create")
        parser.add_argument("--version", dest="msg_version", default=None, help="optional version suffix, e.g. v1")
        parser.add_argument("--start", type=int, default=1, help="first body id (default 1)")
        parser.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="extra STOMP header stored on the row (repeatable), e.g. persistent=true",
        )
        parser.add_argument(
            "--per-row-transaction",
            action="store_true",
            help="one transaction per row (default: all rows in one transaction)",
        )

    def handle(self, *args, **options):
        count = options["count"]
        if count < 0:
            raise CommandError("--count must be >= 0")
        headers = {}
        for item in options["header"]:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CommandError(f"--header expects KEY=VALUE, got {item!r}")
            headers[key] = value

        def create(i):
            kwargs = {
                "destination": options["destination"],
                "body": {"id": i, "source": "python", "price": "1.50"},
            }
            if options["msg_version"]:
                kwargs["version"] = options["msg_version"]
            if headers:
                kwargs["headers"] = dict(headers)
            return Published.objects.create(**kwargs)

        ids = range(options["start"], options["start"] + count)
        rows = []
        if options["per_row_transaction"]:
            for i in ids:
                with transaction.atomic():
                    rows.append(create(i))
        else:
            with transaction.atomic():
                rows = [create(i) for i in ids]

        for row in rows:
            self.stdout.write(f"{row.id}\t{row.destination}")
