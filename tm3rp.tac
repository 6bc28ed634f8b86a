# Deploy the TM3 remote proxy with `twistd -ny tm3rp.tac` (or -y to daemonize).
# Settings come from the environment; TM3_PIPES is required:
#   TM3_PIPES=4 TM3_LISTEN=tcp:6000 TM3_MAX_PAYLOAD=4096 TM3_CONNECT_TIMEOUT=10 \
#   TM3_CONN_QUEUE=4MiB TM3_TOTAL_QUEUE=64MiB TM3_ALLOW_TO="10.0.0.0/8" twistd -ny tm3rp.tac
import sys

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage

from tm3.cli import EXIT_USAGE
from tm3.logs import tac_observer
from tm3.rp.tap import makeService, options_from_env

try:
    config = options_from_env()
except usage.UsageError as e:
    print(f"tm3rp.tac: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)  # a service manager need not retry

application = service.Application("tm3rp")
observer = tac_observer(config["log-format"])  # TM3_LOG_FORMAT=json: JSON lines on stdout
if observer is not None:
    application.setComponent(ILogObserver, observer)
makeService(config).setServiceParent(application)
