"""Settings of the minimal Django project used by the interop tests.

Everything that a test may need to vary comes from environment variables:

  DOP_DATABASE_NAME      database on the local PostgreSQL (default: dop_interop)
  DOP_DATABASE_USER      (default: postgres)   DOP_DATABASE_PASSWORD (default: empty, trust auth)
  DOP_DATABASE_HOST      (default: 127.0.0.1)  DOP_DATABASE_PORT     (default: 5432)
  DOP_STOMP_HOST         (default: 127.0.0.1)  DOP_STOMP_PORT        (default: 61613)
  DOP_STOMP_USERNAME / DOP_STOMP_PASSCODE (default: guest / guest)
  DOP_STOMP_VHOST        (default: /)
  DOP_PRODUCER_WAITING_TIME (default: 1; the library casts it with int(), so 0 means busy polling)
  DOP_CONSUMER_SHUTDOWN_TIMEOUT (default: 10 s; the library default is 90 s)
  DOP_LOG_LEVEL          (default: INFO)
  DOP_RECORD_FILE        JSON-lines file written by interop_app.callbacks.record
"""
import os

BASE_DIR = os.path.dirname(os.path.abspath(__file__))

SECRET_KEY = "interop-tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django_outbox_pattern",
    "interop_app",
]

MIDDLEWARE = []
ROOT_URLCONF = "urls"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DOP_DATABASE_NAME", "dop_interop"),
        "USER": os.environ.get("DOP_DATABASE_USER", "postgres"),
        "PASSWORD": os.environ.get("DOP_DATABASE_PASSWORD", ""),
        "HOST": os.environ.get("DOP_DATABASE_HOST", "127.0.0.1"),
        "PORT": os.environ.get("DOP_DATABASE_PORT", "5432"),
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False

# Library settings are read ONCE, when django_outbox_pattern.settings is imported.
DJANGO_OUTBOX_PATTERN = {
    "DEFAULT_STOMP_HOST_AND_PORTS": [
        (os.environ.get("DOP_STOMP_HOST", "127.0.0.1"), int(os.environ.get("DOP_STOMP_PORT", "61613")))
    ],
    "DEFAULT_STOMP_USERNAME": os.environ.get("DOP_STOMP_USERNAME", "guest"),
    "DEFAULT_STOMP_PASSCODE": os.environ.get("DOP_STOMP_PASSCODE", "guest"),
    "DEFAULT_STOMP_VHOST": os.environ.get("DOP_STOMP_VHOST", "/"),
    "DEFAULT_PRODUCER_WAITING_TIME": int(os.environ.get("DOP_PRODUCER_WAITING_TIME", "1")),
    "DEFAULT_CONSUMER_SHUTDOWN_TIMEOUT": int(os.environ.get("DOP_CONSUMER_SHUTDOWN_TIMEOUT", "10")),
}

LOG_LEVEL = os.environ.get("DOP_LOG_LEVEL", "INFO").upper()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"},
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "plain",
        },
    },
    "root": {"handlers": ["stderr"], "level": LOG_LEVEL},
    "loggers": {
        # stomp.py is chatty at INFO (one line per connect / frame); keep it at WARNING
        # unless DOP_LOG_LEVEL=DEBUG.
        "stomp.py": {"level": "DEBUG" if LOG_LEVEL == "DEBUG" else "WARNING"},
        "django": {"level": "WARNING" if LOG_LEVEL != "DEBUG" else "DEBUG"},
    },
}
