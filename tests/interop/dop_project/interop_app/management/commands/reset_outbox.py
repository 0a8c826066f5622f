"""Delete every row of the `published` and `received` tables (test isolation).

    manage.py reset_outbox [--published-only | --received-only]
"""
from django.core.management.base import BaseCommand
from django.db import transaction

from django_outbox_pattern.models import Published
from django_outbox_pattern.models import Received


class Command(BaseCommand):
    help = "Delete all rows of the published and received tables"

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--published-only", action="store_true")
        group.add_argument("--received-only", action="store_true")

    def handle(self, *args, **options):
        with transaction.atomic():
            p = r = 0
            if not options["received_only"]:
                p, _ = Published.objects.all().delete()
            if not options["published_only"]:
                r, _ = Received.objects.all().delete()
        self.stdout.write(f"deleted published={p} received={r}")
