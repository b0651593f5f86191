"""`python -m migrations`: bring the configured database to the newest revision, as the service does on start-up.

The one command for deploy pipelines (and `make migrate`); it adopts a database made before migrations
existed, and waits for any other process migrating the same database.
"""

import logging
import sys

from database import migrate_database
from settings import load_settings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
settings = load_settings()
migrate_database(settings.migration_database)
print(f"{settings.migration_database.render_as_string(hide_password=True)} is at the newest revision")
