"""Print the number of rows in the `published` (outbox) table.

    manage.py count_published [--status schedule|succeeded|failed] [--destination D]
"""
from django.core.management.base import BaseCommand

from django_outbox_pattern.choices import StatusChoice
from django_outbox_pattern.models import Published

_STATUS = {"schedule": StatusChoice.SCHEDULE, "succeeded": StatusChoice.SUCCEEDED, "failed": StatusChoice.FAILED}


class Command(BaseCommand):
    help = "Print the number of published rows, optionally by status / destination"

    def add_arguments(self, parser):
        parser.add_argument("--status", choices=sorted(_STATUS), default=None)
        parser.add_argument("--destination", default=None, help="exact destination (with version suffix)")

    def handle(self, *args, **options):
        qs = Published.objects.all()
        if options["status"]:
            qs = qs.filter(status=_STATUS[options["status"]])
        if options["destination"]:
            qs = qs.filter(destination=options["destination"])
        self.stdout.write(str(qs.count()))
