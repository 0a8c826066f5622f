#!/usr/bin/env python3
"""Django entry point of the interop project.

Run it with the interop virtualenv's interpreter, e.g.
    "$INTEROP_PYTHON" "$INTEROP_MANAGE" publish
(see tests/interop/env.sh).
"""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
