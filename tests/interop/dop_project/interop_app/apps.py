from django.apps import AppConfig


class InteropAppConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "interop_app"
