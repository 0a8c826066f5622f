"""No HTTP endpoints: the interop project is driven by management commands only."""
urlpatterns = []
