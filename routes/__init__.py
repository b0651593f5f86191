"""The service's routers."""
