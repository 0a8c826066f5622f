"""Print the number of rows in the `received` (inbox / dedup) table.

    manage.py count_received [--distinct] [--destination /topic/x]

--distinct counts distinct msg_id values instead of rows; --destination filters on the
STOMP `destination` header stored with each row.
"""
from django.core.management.base import BaseCommand

from django_outbox_pattern.models import Received


class Command(BaseCommand):
    help = "Print the number of received rows (or of distinct msg ids)"

    def add_arguments(self, parser):
        parser.add_argument("--distinct", action="store_true", help="count distinct msg_id values")
        parser.add_argument("--destination", default=None, help="only rows whose destination header equals this")

    def handle(self, *args, **options):
        qs = Received.objects.all()
        if options["destination"]:
            qs = qs.filter(headers__destination=options["destination"])
        if options["distinct"]:
            n = qs.exclude(msg_id__isnull=True).values("msg_id").distinct().count()
        else:
            n = qs.count()
        self.stdout.write(str(n))
