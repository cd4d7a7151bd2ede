"""The Prefect flows: the run, its stages, the demo and the command line.

Every entry point (the command, the benchmarks, a user's own script) imports this
package before Prefect starts its temporary server, so the server's defaults live here.
"""

import os

# No network is assumed: Prefect's server would otherwise try to send telemetry (and,
# on a busy SQLite database, print a "database is locked" traceback when it fails).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server gets 20 s to start by default; a machine busy with
# training (or a slow disk) can need longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
